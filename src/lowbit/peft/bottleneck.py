"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) on any linear base — lowbit's own.

A small residual MLP on a layer's output: ``y + up(act(down(y)))`` with ``down`` [d, out] + bias,
``up`` [out, d] + bias, ``d = max(1, out // reduction_factor)``. ``up`` starts at zero, so the
adapter starts as the base. Placement chooses the layers when ``target_modules`` is None:

* ``"houlsby"``: after the attention output projection and after the feed-forward output;
* ``"pfeiffer"``: after the feed-forward output only.

peft has no such method; the files use peft's layout with ``peft_type: "LOWBIT_BOTTLENECK"`` and keys
``base_model.model.<module>.adapter_down.weight`` / ``.bias``, ``….adapter_up.weight`` / ``.bias``.
The activation sits between two linear maps, so the adapter cannot be merged into the weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft.base import AdapterLayer, LayerAdapter, find_targets
from lowbit.peft.config import AdapterConfig
from lowbit.peft.model import LayerMethod, register_method

PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

# (attention output projection, feed-forward output) as whole-name regexes, per model family
LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("llama-like", r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    ("bert", r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    ("gpt2", r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
)


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter settings.

    Attributes:
        placement: ``"houlsby"`` (after attention output and FFN output) or ``"pfeiffer"`` (FFN only).
        reduction_factor: hidden size / bottleneck size (bottleneck d = max(1, out // reduction_factor)).
        non_linearity: ``"relu"``, ``"gelu"`` or ``"silu"``.
        target_modules: None (by placement: Llama-like, BERT, GPT-2 layouts), or layer names / a regex.
        exclude_modules, modules_to_save: as in :class:`LoraConfig`.
    """

    peft_type = "LOWBIT_BOTTLENECK"
    placement: str = "houlsby"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    target_modules: Any = None
    exclude_modules: Any = None
    modules_to_save: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise InvalidSpecError(f"BottleneckConfig.placement must be one of {', '.join(PLACEMENTS)}, "
                                   f"got {self.placement!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 1:
            raise InvalidSpecError(f"BottleneckConfig.reduction_factor must be a positive integer, "
                                   f"got {self.reduction_factor!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise InvalidSpecError(f"BottleneckConfig.non_linearity must be one of {', '.join(ACTIVATIONS)}, "
                                   f"got {self.non_linearity!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)


class BottleneckAdapter(LayerAdapter):
    """``y + up(act(down(y)))``: ``adapter_down`` Linear(out → d), ``adapter_up`` Linear(d → out), up = 0."""

    mergeable = False

    def __init__(self, features: int, reduction_factor: int, non_linearity: str) -> None:
        super().__init__()
        hidden = max(1, features // reduction_factor)
        self.non_linearity = non_linearity
        self.adapter_down = nn.Linear(features, hidden)
        self.adapter_up = nn.Linear(hidden, features)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def update_output(self, x: torch.Tensor, y: torch.Tensor, layer: AdapterLayer) -> torch.Tensor:
        """y [..., out] → y + up(act(down(y))) (computed in the adapter's dtype)."""
        h = y if torch.is_autocast_enabled() else y.to(self.adapter_down.weight.dtype)
        return y + self.adapter_up(ACTIVATIONS[self.non_linearity](self.adapter_down(h))).to(y.dtype)

    def merged(self, weight: torch.Tensor, bias: torch.Tensor | None,
               layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise LowbitError(f"{layer.layer_name}: a bottleneck adapter applies a non-linearity to the layer's output "
                          "and cannot be merged into its weight; keep it as an adapter (or use LoRA/IA3 to merge)")

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {f"{part}.{kind}": getattr(getattr(self, part), kind).detach()
                for part in ("adapter_down", "adapter_up") for kind in ("weight", "bias")}

    def peft_tensor(self, suffix: str) -> torch.Tensor | None:
        part, _, kind = suffix.partition(".")
        if part not in ("adapter_down", "adapter_up") or kind not in ("weight", "bias"):
            return None
        return getattr(getattr(self, part), kind)


def make_bottleneck(layer: AdapterLayer, config: BottleneckConfig, adapter_name: str,
                    module_name: str) -> BottleneckAdapter:
    return BottleneckAdapter(layer.out_features, config.reduction_factor, config.non_linearity)


def placement_targets(model: nn.Module, placement: str) -> str:
    """The regex of the layers ``placement`` adapts in this model (the first known layout that fits)."""
    names = [n for n, _ in model.named_modules()]
    for _, attn, ffn in LAYOUTS:
        if any(re.fullmatch(ffn, n) for n in names):
            return f"({attn})|({ffn})" if placement == "houlsby" else ffn
    raise InvalidSpecError(f"BottleneckConfig: no known layout (Llama-like o_proj/down_proj, BERT "
                           f"attention.output.dense/output.dense, GPT-2 attn.c_proj/mlp.c_proj) in "
                           f"{type(model).__name__}; give target_modules")


class _BottleneckMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(make_bottleneck)

    def targets(self, model: nn.Module, config: Any) -> list[str]:
        targets = config.target_modules
        if targets is None:
            targets = placement_targets(model, config.placement)
        return find_targets(model, targets, config.exclude_modules, "BottleneckConfig")


register_method("LOWBIT_BOTTLENECK", _BottleneckMethod())
