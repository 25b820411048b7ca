"""Methods that quantize activations too: static/dynamic W8A8, SmoothQuant W8A8, LLM.int8()."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.calib_data import CalibConfig
from lowbit.errors import InvalidSpecError
from lowbit.formats.act import OBSERVERS, ActSpec
from lowbit.models.targets import select_targets
from lowbit.recipe import QuantRecipe


@dataclass(frozen=True)
class W8A8Options:
    alpha: float = 0.5            # smoothquant: migration strength
    act_dynamic: bool = False     # per-token dynamic activation scales instead of calibrated per-tensor ones
    act_observer: str = "minmax"  # static: minmax | ema | percentile | mse
    act_symmetric: bool = False   # static: symmetric activation codes (asymmetric suits post-GELU inputs)
    threshold: float = 6.0        # llm-int8: |x| above this keeps an input column in floating point

    def __post_init__(self) -> None:
        if self.act_observer not in OBSERVERS:
            raise InvalidSpecError(f"unknown activation observer {self.act_observer!r}; expected one of {OBSERVERS}")
        if self.threshold <= 0:
            raise InvalidSpecError(f"llm-int8 threshold must be > 0, got {self.threshold}")

    def act_spec(self) -> ActSpec:
        if self.act_dynamic:
            return ActSpec.dynamic_per_token()
        return ActSpec.static(self.act_observer, symmetric=self.act_symmetric)


def quantize_with_activations(model: nn.Module, recipe: QuantRecipe, options: W8A8Options, tokenizer: Any,
                              calibration: CalibConfig, *, device: str | torch.device = "cpu",
                              show_progress: bool = False) -> nn.Module:
    """Quantize weights and activations of ``model`` in place according to ``recipe.method``."""
    from lowbit.activation import quantize_llm_int8, quantize_w8a8

    weights = dataclasses.replace(recipe, method="rtn", options=())  # weights: round-to-nearest per the recipe
    if recipe.method == "llm-int8":
        quantize_llm_int8(model, options.threshold, weight_spec=weights)
    else:
        if recipe.method == "smoothquant":
            from lowbit.algorithms.smoothquant import SmoothQuantConfig, smooth_model

            smooth_model(model, tokenizer, calibration, select_targets(model, recipe), SmoothQuantConfig(options.alpha),
                         device=device, show_progress=show_progress)
        quantize_w8a8(model, tokenizer, calibration, act_spec=options.act_spec(), weight_spec=weights, device=device,
                      show_progress=show_progress)
    model.lowbit_method = recipe.method  # type: ignore[attr-defined]
    return model
