"""``lowbit.quantize``: replace a model's linear layers with quantized ones (in memory)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lowbit.formats.spec import QuantSpec
from lowbit.models.targets import check_target_shapes, select_targets, set_submodule
from lowbit.nn.quant_linear import QuantLinear
from lowbit.progress import progress
from lowbit.recipe import QuantRecipe, as_recipe


def quantize(model: nn.Module, spec_or_recipe: QuantSpec | QuantRecipe | dict[str, Any], *,
             show_progress: bool = False) -> nn.Module:
    """Quantize ``model``'s ``nn.Linear`` / transformers ``Conv1D`` layers in place (round-to-nearest).

    Args:
        model: any PyTorch module; Hugging Face models keep working unchanged.
        spec_or_recipe: one :class:`QuantSpec` for every layer, or a :class:`QuantRecipe` with
            skip/include patterns and per-layer overrides (mixed precision). ``lm_head`` is skipped
            by default, and weights tied to an embedding are never quantized.
    Returns:
        the same ``model`` object, its layers now :class:`~lowbit.nn.QuantLinear`.
    """
    recipe = as_recipe(spec_or_recipe)
    targets = select_targets(model, recipe)
    check_target_shapes(model, targets)
    for name in progress(targets, desc="quantize", enabled=show_progress, unit="layer"):
        module = model.get_submodule(name)
        device = module.weight.device
        qlinear = QuantLinear.from_float(module, targets[name], name).to(device)
        set_submodule(model, name, qlinear)
    model.lowbit_method = recipe.method  # type: ignore[attr-defined]
    return model
