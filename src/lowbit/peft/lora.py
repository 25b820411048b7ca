"""LoRA and its family on any linear base: rsLoRA scaling, DoRA, PiSSA and LoftQ initialisation.

``y = base(x) + s · B A dropout(x)`` with A [r, in], B [out, r], ``s = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``). DoRA rescales each output row to a learned magnitude m [out]:
``y = m / ‖W + s·BA‖_row · (W + s·BA) x + b`` (the norm is treated as a constant, as in the paper
and peft). PiSSA starts A, B at the top-r singular triplets of W and keeps the residual in the base
(re-quantized with the base's spec when it is quantized); LoftQ alternates lowbit's quantizer with
an SVD of the quantization error so that ``Q + s·BA ≈ W`` from the first step, for every format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft.base import AdapterLayer, LayerAdapter, check_rank, set_base_weight
from lowbit.peft.config import AdapterConfig, check_positive, check_scaling, finite_number
from lowbit.peft.model import LayerMethod, register_method


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (and DoRA / rsLoRA / PiSSA / LoftQ) settings, with Hugging Face peft's field names.

    Attributes:
        r: rank; ``rank_pattern`` ({regex or layer suffix: r}) overrides it per layer.
        lora_alpha: scaling numerator; ``alpha_pattern`` overrides it per layer.
        target_modules: layer names (a name matches itself or ``*.name``), one regex matched against
            the whole module name, or ``"all-linear"`` (every linear layer but the output head).
        init_lora_weights: ``True`` (Kaiming A, zero B: starts as the base), ``"gaussian"``, ``False``
            (random B: for tests), ``"pissa"`` / ``"pissa_niter_N"``, ``"loftq"``.
        loftq_config: ``{"loftq_iter": 1, "spec": QuantSpec dict}``; LoftQ quantizes the (float)
            targeted layers to ``spec`` (default: the NF4 of QLoRA, 64-blocks, double-quant).
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` biases train too.
        modules_to_save: modules trained in full beside the adapter (e.g. ``["lm_head"]``).
    """

    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None
    exclude_modules: Any = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    modules_to_save: Any = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    loftq_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("LoraConfig", r=self.r, lora_alpha=self.lora_alpha)
        check_scaling("LoraConfig", "lora_alpha", self.lora_alpha)
        if not isinstance(self.r, int):
            raise InvalidSpecError(f"LoraConfig.r must be an integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidSpecError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "loftq")
                or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))):
            raise InvalidSpecError(f"LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', "
                                   f"'pissa_niter_N' or 'loftq'; got {init!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        unknown = sorted(set(self.loftq_config) - {"loftq_iter", "loftq_bits", "spec"})
        if unknown:
            raise InvalidSpecError(f"LoraConfig.loftq_config: unknown key(s) {unknown}")
        for what, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except re.error as exc:
                    raise InvalidSpecError(f"LoraConfig.{what}: key {key!r} is not a regular expression "
                                           f"({exc})") from None
                integer = isinstance(value, int) or what == "alpha_pattern"
                if not finite_number(value) or value <= 0 or not integer:
                    raise InvalidSpecError(f"LoraConfig.{what}[{key!r}] must be a positive "
                                           f"{'integer' if what == 'rank_pattern' else 'number'}, got {value!r}")
                check_scaling("LoraConfig", f"{what}[{key!r}]", value)

    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return _pattern_value(self.alpha_pattern, name, self.lora_alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        if self.init_lora_weights in ("loftq",) or str(self.init_lora_weights).startswith("pissa"):
            # what is saved is a trained adapter for a stated base: loading must not re-initialise it
            data["init_lora_weights"] = True
        data["loftq_config"] = {}
        return data


def _pattern_value(pattern: dict, name: str, default: Any) -> Any:
    for key, value in pattern.items():  # peft's rule: the key matches a trailing part of the name
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LoraAdapter(LayerAdapter):
    """One LoRA adapter: ``lora_A`` (in → r), ``lora_B`` (r → out), optional DoRA magnitude [out]."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, config: LoraConfig) -> None:
        super().__init__()
        self.r = r
        self.scaling = config.scaling(r, alpha)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features)) if config.use_dora else None
        init = config.init_lora_weights
        if init is True or isinstance(init, str):
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        self.pissa_start: tuple[torch.Tensor, torch.Tensor] | None = None  # (A0, B0) for saving as plain LoRA

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def delta_weight(self) -> torch.Tensor:
        """s · B A [out, in] (float32)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def update_output(self, x: torch.Tensor, y: torch.Tensor, layer: AdapterLayer) -> torch.Tensor:
        dtype = self.lora_A.weight.dtype
        xd = self.dropout(x if torch.is_autocast_enabled(x.device.type) else x.to(dtype))
        lora = self.lora_B(self.lora_A(xd))
        if not self.use_dora:
            return torch.add(y, lora.to(y.dtype), alpha=self.scaling)
        weight = layer.base_weight(torch.float32).detach()
        norm = (weight + self.delta_weight().detach()).norm(dim=1).detach()
        mag = (self.lora_magnitude_vector / norm.to(self.lora_magnitude_vector.dtype))
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = layer.base_bias
            base = y if bias is None else y - bias.to(y.dtype)
        else:
            base = F.linear(xd.to(weight.dtype), weight)
        return y + ((mag - 1) * base.to(mag.dtype) + mag * lora.to(mag.dtype) * self.scaling).to(y.dtype)

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None,
               layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        new = weight + self.delta_weight().to(weight.device)
        if self.use_dora:
            mag = self.lora_magnitude_vector.detach().float().to(weight.device)
            new = (mag / new.norm(dim=1)).unsqueeze(1) * new
        return new, bias

    def init_dora_magnitude(self, layer: AdapterLayer) -> None:
        with torch.no_grad():
            norm = (layer.base_weight().to(self.lora_A.weight.device) + self.delta_weight()).norm(dim=1)
            self.lora_magnitude_vector.copy_(norm)

    # ---- peft's file ----------------------------------------------------------------------
    def peft_state(self) -> dict[str, torch.Tensor]:
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if self.pissa_start is not None:  # as plain LoRA of rank 2r over the original W
            a0, b0 = self.pissa_start
            a, b = torch.cat([a, a0.to(a)], 0), torch.cat([b, -b0.to(b)], 1)
        state = {"lora_A.weight": a, "lora_B.weight": b}
        if self.use_dora:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector.detach()
        return state

    def peft_tensor(self, suffix: str) -> torch.Tensor | None:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight,
                "lora_magnitude_vector": self.lora_magnitude_vector}.get(suffix)


def make_lora(layer: AdapterLayer, config: LoraConfig, adapter_name: str, module_name: str) -> LoraAdapter:
    r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
    adapter = LoraAdapter(layer.in_features, layer.out_features, r, alpha, config)
    adapter.to(layer.weight_device)
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith("pissa"):
        _pissa_init(adapter, layer, init)
    elif init == "loftq":
        _loftq_init(adapter, layer, config)
    if adapter.use_dora:
        adapter.init_dora_magnitude(layer)
    return adapter


def check_lora(module_name: str, base: nn.Module, config: LoraConfig) -> None:
    from lowbit.models.targets import linear_dims

    in_features, out_features = linear_dims(base)
    check_rank(module_name, config.rank_for(module_name), in_features, out_features)
    if config.init_lora_weights == "loftq":
        from lowbit.nn.quant_linear import QuantLinear

        if isinstance(base, QuantLinear):
            raise LowbitError(f"{module_name}: LoftQ needs the float weights (it chooses the quantized base "
                              "itself); apply it to the float model with loftq_config={'spec': ...}")


def _pissa_init(adapter: LoraAdapter, layer: AdapterLayer, init: str) -> None:
    weight = layer.base_weight().to(adapter.lora_A.weight.device)
    r = adapter.r
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        ur, sr, vhr = u[:, :r], s[:r], vh[:r]
    else:
        niter = int(init.rsplit("_", 1)[1])
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        ur, sr, vhr = u, s, v.t()
    root = torch.sqrt(sr / adapter.scaling)
    with torch.no_grad():
        adapter.lora_A.weight.copy_(root.unsqueeze(1) * vhr)
        adapter.lora_B.weight.copy_(ur * root.unsqueeze(0))
    adapter.pissa_start = (adapter.lora_A.weight.detach().clone(), adapter.lora_B.weight.detach().clone())
    bias = None if layer.base_bias is None else layer.base_bias.detach().float()
    set_base_weight(layer, weight - adapter.delta_weight(), bias)


def _loftq_init(adapter: LoraAdapter, layer: AdapterLayer, config: LoraConfig) -> None:
    from lowbit.formats.spec import QuantSpec
    from lowbit.tensor import QuantizedWeight

    spec_data = config.loftq_config.get("spec")
    spec = QuantSpec.from_dict(spec_data, "loftq_config.spec") if spec_data else QuantSpec.nf4(64, double_quant=True)
    iters = int(config.loftq_config.get("loftq_iter", 1))
    weight = layer.base_weight().to(adapter.lora_A.weight.device)
    r = adapter.r
    lowrank = torch.zeros_like(weight)
    for _ in range(max(1, iters)):
        qw = QuantizedWeight.from_float(weight - lowrank, spec, layer.layer_name)
        residual = weight - qw.dequantize()
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = torch.sqrt(s[:r] / adapter.scaling)
        a, b = root.unsqueeze(1) * vh[:r], u[:, :r] * root.unsqueeze(0)
        lowrank = adapter.scaling * (b @ a)
    with torch.no_grad():
        adapter.lora_A.weight.copy_(a)
        adapter.lora_B.weight.copy_(b)
    from lowbit.nn.quant_linear import QuantLinear

    bias = layer.base_bias
    layer.base_layer = QuantLinear.from_weight(qw, None if bias is None else bias.detach()).to(layer.weight_device)


class _LoraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(make_lora)
        self.check = check_lora

    def saved_config(self, model: nn.Module, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """A PiSSA adapter is saved as plain LoRA of rank 2r over the original weight (see peft_state)."""
        from lowbit.peft.model import adapter_config

        from lowbit.models.targets import is_conv1d
        from lowbit.peft.base import adapter_layers

        config = adapter_config(model, name)
        if any(is_conv1d(layer.base_layer) for layer in adapter_layers(model).values() if name in layer.adapters):
            data["fan_in_fan_out"] = True  # what peft sets (and warns about) for transformers Conv1D weights
        if str(config.init_lora_weights).startswith("pissa"):
            grow = 2 ** 0.5 if config.use_rslora else 2  # keeps alpha / r (or alpha / sqrt r) unchanged
            data["r"] = 2 * config.r
            data["lora_alpha"] = config.lora_alpha * grow
            data["rank_pattern"] = {k: 2 * v for k, v in config.rank_pattern.items()}
            data["alpha_pattern"] = {k: v * grow for k, v in config.alpha_pattern.items()}
        return data


register_method("LORA", _LoraMethod())
