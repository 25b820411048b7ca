"""One adapter mechanism over any linear base: nn.Linear, transformers Conv1D, QuantLinear (any spec).

An adapted layer is an :class:`AdapterLayer`: it keeps the original module as ``base_layer`` and
holds the adapters by name in a ``ModuleDict`` (one :class:`LayerAdapter` per name, of any method).
Adapters only need the base's forward (and its backward w.r.t. the input, which QuantLinear has),
so there is no adapter class per quantization format. Merging reads the base weight as float
(dequantized for QuantLinear), lets each adapter fold itself in, and writes the result back —
re-quantized with the base's own spec for a quantized base (see :mod:`lowbit.peft.merge`).
"""

from __future__ import annotations

import abc
import difflib
import re
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.models.build import output_head_name
from lowbit.models.targets import float_weight, is_conv1d, is_linear, linear_dims
from lowbit.nn.quant_linear import QuantLinear

BASE_NAME = "__base__"  # per-sample adapter name meaning "no adapter" (as in peft)


class LayerAdapter(nn.Module, metaclass=abc.ABCMeta):
    """One named adapter on one linear layer. Methods override what they change.

    ``scale_input`` runs on the base's input, ``update_output`` on its output (``y`` [..., out],
    bias included); ``merged`` folds the adapter into a float weight [out, in] and bias [out].
    """

    mergeable = True

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def update_output(self, x: torch.Tensor, y: torch.Tensor, layer: "AdapterLayer") -> torch.Tensor:
        return y

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None,
               layer: "AdapterLayer") -> tuple[torch.Tensor, torch.Tensor | None]:
        raise LowbitError(f"{type(self).__name__} adapters cannot be merged into the base weight")

    @abc.abstractmethod
    def peft_state(self) -> dict[str, torch.Tensor]:
        """{key suffix as in peft's file (``lora_A.weight`` …): tensor}."""

    def load_peft_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        for suffix, tensor in state.items():
            target = self.peft_tensor(suffix)
            if target is None:
                raise LowbitError(f"{where}: unexpected adapter tensor {suffix!r}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise LowbitError(f"{where}.{suffix}: adapter has shape {tuple(tensor.shape)}, the layer needs "
                                  f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))

    def peft_tensor(self, suffix: str) -> torch.Tensor | None:
        """The live tensor that ``peft_state()[suffix]`` reads."""
        return None


class AdapterLayer(nn.Module):
    """A linear base plus named adapters. Forward: ``y = base(scale_input(x))``, then each active
    adapter's ``update_output``. With ``sample_adapters`` set (one name per batch row), each row
    goes through its own adapter (``"__base__"``: none)."""

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.layer_name = name
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.sample_adapters: Sequence[str] | None = None
        self._stash: dict[str, Any] | None = None  # the base as it was before merging (exact unmerge)

    # ---- the base ---------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return linear_dims(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return linear_dims(self.base_layer)[1]

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.base_layer, QuantLinear)

    @property
    def weight_device(self) -> torch.device:
        for t in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            return t.device
        return torch.device("cpu")

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight [out, in] as float (dequantized for a QuantLinear)."""
        if isinstance(self.base_layer, QuantLinear):
            return self.base_layer.weight.dequantize(dtype)
        return float_weight(self.base_layer).to(dtype)

    @property
    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                raise LowbitError(f"{self.layer_name}: adapters {self.merged_adapters} are merged into the base; "
                                  "unmerge them before disabling adapters")
            return self.base_layer(x, *args, **kwargs)
        if self.sample_adapters is not None:
            return self._forward_per_sample(x, self.sample_adapters)
        names = [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        return self._forward_with(x, [self.adapters[n] for n in names])

    def _forward_with(self, x: torch.Tensor, adapters: list[LayerAdapter]) -> torch.Tensor:
        if adapters and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # once, for the base and every adapter
        h = x
        for adapter in adapters:
            h = adapter.scale_input(h)
        y = self.base_layer(h)
        for adapter in adapters:
            y = adapter.update_output(x, y, self)
        return y

    def _forward_per_sample(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        if self.merged_adapters:
            raise LowbitError(f"{self.layer_name}: per-sample adapter names need unmerged adapters")
        if len(names) != x.shape[0]:
            raise InvalidSpecError(f"{len(names)} adapter names for a batch of {x.shape[0]} rows")
        out: torch.Tensor | None = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            adapters = [] if name == BASE_NAME or name not in self.adapters else [self.adapters[name]]
            y = self._forward_with(x.index_select(0, rows), adapters)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, rows, y)
        assert out is not None
        return out

    # ---- merging ------------------------------------------------------------------------
    def merged_weight(self, names: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float weight [out, in] and bias with the named adapters folded in (the base is unchanged)."""
        weight = self.base_weight()
        bias = None if self.base_bias is None else self.base_bias.detach().float()
        for name in names:
            adapter = self.adapters[name]
            if not adapter.mergeable:
                raise LowbitError(f"{self.layer_name}: adapter {name!r} ({type(adapter).__name__}) cannot be merged")
            weight, bias = adapter.merged(weight, bias, self)
        return weight, bias

    def stash_base(self) -> None:
        if self._stash is None:
            self._stash = {"module": self.base_layer,
                           "state": {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}}

    def restore_base(self) -> None:
        if self._stash is None:
            raise LowbitError(f"{self.layer_name}: nothing is merged")
        module: nn.Module = self._stash["module"]
        module.load_state_dict(self._stash["state"])
        self.base_layer = module
        self._stash = None
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}, merged={self.merged_adapters}"


def set_base_weight(layer: AdapterLayer, weight: torch.Tensor, bias: torch.Tensor | None,
                    quantizer: Callable[[torch.Tensor, Any, str], Any] | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Write a float weight [out, in] (and bias) back into the layer's base.

    A QuantLinear base is re-quantized with its own spec by ``quantizer(weight, spec, name)``
    (default round-to-nearest) — or replaced by a float ``nn.Linear`` of ``dtype`` when given.
    A float base keeps its module and dtype (``dtype`` casts it).
    """
    base = layer.base_layer
    device = layer.weight_device
    if isinstance(base, QuantLinear) and dtype is None:
        from lowbit.tensor import QuantizedWeight

        quantize = quantizer or QuantizedWeight.from_float
        qw = quantize(weight, base.spec, layer.layer_name)
        new = QuantLinear.from_weight(qw, bias, act_spec=base.act_spec,
                                      input_scale=getattr(base, "input_scale", None),
                                      input_zero=getattr(base, "input_zero", None))
        layer.base_layer = new.to(device)
        return
    if isinstance(base, QuantLinear):
        lin = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        lin.requires_grad_(False)
        layer.base_layer = lin
        return
    with torch.no_grad():
        base.weight.copy_((weight.t() if is_conv1d(base) else weight).to(base.weight.dtype))
        if bias is not None and base.bias is not None:
            base.bias.copy_(bias.to(base.bias.dtype))
    if dtype is not None:
        base.to(dtype)


# ---- targets ---------------------------------------------------------------------------
def target_matches(target: str | Sequence[str] | None, name: str) -> bool:
    """peft's rule: a string is a regular expression matched against the whole name; a list matches
    a name equal to an entry or ending in ``.entry``."""
    if target is None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == key or name.endswith("." + key) for key in target)


def find_targets(model: nn.Module, target_modules: str | Sequence[str] | None, exclude: str | Sequence[str] | None,
                 what: str, extra_skip: Iterable[str] = ()) -> list[str]:
    """Names of the linear layers ``target_modules`` selects (``"all-linear"``: every linear layer but
    the output head). Nothing matched is an error listing the nearest layer names."""
    skip = set(extra_skip)
    linears = [n for n, m in model.named_modules()  # an already-adapted layer counts as its wrapper's name
               if n and (isinstance(m, AdapterLayer) or (is_linear(m) and not n.endswith(".base_layer")))
               and not _inside_adapter(n)]
    if target_modules is None:
        raise InvalidSpecError(f"{what}: target_modules is required (layer names, a regex, or 'all-linear')")
    if target_modules == "all-linear":
        head = output_head_name(model)
        chosen = [n for n in linears if n != head and n not in skip]
    else:
        chosen = [n for n in linears if target_matches(target_modules, n)]
    chosen = [n for n in chosen if not target_matches(exclude, n)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        near = sorted({c for w in wanted for c in difflib.get_close_matches(str(w).rsplit(".", 1)[-1], leaves, n=3,
                                                                          cutoff=0.4)})
        raise InvalidSpecError(f"{what}: target_modules {target_modules!r} matches no linear layer"
                               + (f"; nearest names: {', '.join(near)}" if near else "")
                               + f"; linear layer names here: {', '.join(leaves[:20])}")
    return chosen


def _inside_adapter(name: str) -> bool:
    parts = name.split(".")
    return "adapters" in parts or "modules_to_save" in parts or "original_module" in parts


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def wrap_layer(model: nn.Module, name: str) -> AdapterLayer:
    """The AdapterLayer at ``name``, wrapping the linear module there first if needed."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterLayer):
        return module
    if not is_linear(module):
        raise InvalidSpecError(f"{name}: {type(module).__name__} is not a linear layer; adapters wrap linear layers")
    layer = AdapterLayer(module, name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
    return layer


def unwrap_layer(model: nn.Module, name: str) -> nn.Module:
    layer = model.get_submodule(name)
    assert isinstance(layer, AdapterLayer)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer.base_layer)
    return layer.base_layer


def check_rank(name: str, r: int, in_features: int, out_features: int, what: str = "r") -> None:
    if not isinstance(r, int) or r < 1:
        raise InvalidSpecError(f"{name}: {what} must be a positive integer, got {r!r}")
    if r > min(in_features, out_features):
        raise InvalidSpecError(f"{name}: {what}={r} is larger than this layer allows (weight {out_features}×"
                               f"{in_features}: rank ≤ {min(in_features, out_features)})")
