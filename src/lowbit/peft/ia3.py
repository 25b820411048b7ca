"""(IA)³: learned per-channel scaling vectors on any linear base (Liu et al. 2022), peft's format.

A targeted layer gets one vector ``ia3_l``:

* ordinary layers scale the **output**: ``y = base(x) · l`` with ``l`` stored as [out, 1];
* ``feedforward_modules`` scale the **input**: ``y = base(x · l)`` with ``l`` stored as [1, in].

Vectors start at ones (the adapter starts as the base). Merging multiplies the weight's rows
(output scaling; the bias is scaled too, as peft does) or columns (input scaling).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import InvalidSpecError
from lowbit.peft.base import AdapterLayer, LayerAdapter
from lowbit.peft.config import AdapterConfig
from lowbit.peft.model import LayerMethod, register_method

# peft's defaults (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING) for the
# architectures lowbit's tests use: model_type → (target_modules, feedforward_modules)
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³ settings, with Hugging Face peft's field names.

    Attributes:
        target_modules: layer names (a name matches itself or ``*.name``), one regex matched against
            the whole module name, or ``"all-linear"``. ``None``: peft's default for the model type
            (Llama, Mistral, Qwen2, BERT, GPT-2).
        feedforward_modules: which targeted layers scale their input instead of their output. As in
            peft: a regex (whole name) or a list whose entries match a name's *end*; a list must be a
            subset of a list ``target_modules``.
        exclude_modules: layers never adapted (same matching rule as ``target_modules``).
        init_ia3_weights: ``True``: vectors start at 1 (identity); ``False``: random (for tests).
        modules_to_save: modules trained in full beside the adapter.
        fan_in_fan_out: peft's flag for Conv1D weights; lowbit detects Conv1D itself (informational).
    """

    peft_type = "IA3"
    target_modules: Any = None
    feedforward_modules: Any = None
    exclude_modules: Any = None
    init_ia3_weights: bool = True
    modules_to_save: Any = None
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("target_modules", "feedforward_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, (tuple, set)):
                setattr(self, key, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise InvalidSpecError(f"IA3Config.{key} must be a list of names or a regex, got {value!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise InvalidSpecError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise InvalidSpecError(f"IA3Config.feedforward_modules must be a subset of target_modules; "
                                       f"{extra} are not in target_modules {self.target_modules}")

    def is_feedforward(self, module_name: str) -> bool:
        """peft's rule: a regex matches the whole name; a list entry matches the name's end."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(key) for key in ff)


class IA3Adapter(LayerAdapter):
    """One (IA)³ vector ``ia3_l``: [out, 1] (output scaling) or [1, in] (feedforward: input scaling)."""

    def __init__(self, in_features: int, out_features: int, feedforward: bool, init_ones: bool = True) -> None:
        super().__init__()
        self.feedforward = feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if init_ones else torch.randn(shape))

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → x · l (feedforward layers only)."""
        if not self.feedforward:
            return x
        return (x.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(x.dtype)

    def update_output(self, x: torch.Tensor, y: torch.Tensor, layer: AdapterLayer) -> torch.Tensor:
        """y [..., out] → y · l (non-feedforward layers; the bias is scaled too, as in peft)."""
        if self.feedforward:
            return y
        return (y * self.ia3_l.flatten()).to(y.dtype)

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None,
               layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        l = self.ia3_l.detach().float().to(weight.device)
        if self.feedforward:
            return weight * l, bias  # columns: W[out, in] · l[1, in]
        new_bias = None if bias is None else bias * l.flatten().to(bias.device)
        return weight * l, new_bias  # rows: W[out, in] · l[out, 1]

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l.detach()}

    def peft_tensor(self, suffix: str) -> torch.Tensor | None:
        return self.ia3_l if suffix == "ia3_l" else None


def make_ia3(layer: AdapterLayer, config: IA3Config, adapter_name: str, module_name: str) -> IA3Adapter:
    return IA3Adapter(layer.in_features, layer.out_features, config.is_feedforward(module_name),
                      config.init_ia3_weights)


def resolved_targets(model: nn.Module, config: IA3Config) -> tuple[Any, Any]:
    """(target_modules, feedforward_modules), peft's defaults for the model type filled in."""
    if config.target_modules is not None:
        return config.target_modules, config.feedforward_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise InvalidSpecError(f"IA3Config.target_modules is required for model type {model_type!r} (defaults "
                               f"exist for {', '.join(sorted(DEFAULT_TARGETS))})")
    targets, feedforward = DEFAULT_TARGETS[model_type]
    return list(targets), (list(feedforward) if config.feedforward_modules is None else config.feedforward_modules)


class _IA3Method(LayerMethod):
    def __init__(self) -> None:
        super().__init__(make_ia3)

    def targets(self, model: nn.Module, config: Any) -> list[str]:
        from lowbit.peft.base import find_targets

        targets, _ = resolved_targets(model, config)
        return find_targets(model, targets, config.exclude_modules, "IA3Config")

    def inject(self, model: nn.Module, config: Any, name: str) -> list[str]:
        if config.target_modules is None:  # peft's defaults, written into the config (as peft does)
            config.target_modules, config.feedforward_modules = resolved_targets(model, config)
        return super().inject(model, config, name)


register_method("IA3", _IA3Method())
