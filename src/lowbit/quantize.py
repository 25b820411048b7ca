"""``lowbit.quantize``: replace a model's linear layers with quantized ones (in memory)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from lowbit.formats.spec import QuantSpec
from lowbit.algorithms.weight_only import weight_quantizer
from lowbit.models.targets import (check_target_shapes, float_weight, select_targets, set_submodule,
                                   share_quantized_head, untie_quantized_head)
from lowbit.nn.quant_linear import QuantLinear
from lowbit.progress import progress
from lowbit.recipe import QuantRecipe, as_recipe

if TYPE_CHECKING:
    from lowbit.algorithms.calib_data import CalibConfig


def quantize(model: nn.Module, spec_or_recipe: QuantSpec | QuantRecipe | dict[str, Any], *,
             calibration: "CalibConfig | None" = None, tokenizer: Any = None, device: str = "cpu",
             show_progress: bool = False, checkpoint_dir: Any = None) -> nn.Module:
    """Quantize ``model``'s ``nn.Linear`` / transformers ``Conv1D`` layers in place.

    Args:
        model: any PyTorch module; Hugging Face models keep working unchanged.
        spec_or_recipe: one :class:`QuantSpec` for every layer (round-to-nearest), or a
            :class:`QuantRecipe` with a method (``rtn``, ``gptq``), skip/include patterns and per-layer
            overrides (mixed precision). ``lm_head`` is skipped by default; an output head tied to
            the input embedding is quantized only when an override names it, and is then untied
            (the embedding stays float) or, with the recipe's ``tied_head="share"``, shared (the
            embedding reads its rows from the quantized head: one quantized matrix).
        calibration: calibration data for data-driven methods (default: the built-in demo corpus).
        tokenizer: tokenizer for the calibration text (default: loaded from ``model.lowbit_source``).
        device: where blocks are computed during calibration.
        checkpoint_dir: GPTQ/AWQ: save each finished block there and resume from it (see
            :func:`lowbit.algorithms.ptq.quantize_calibrated`).
    Returns:
        the same ``model`` object, its layers now :class:`~lowbit.nn.QuantLinear`.
    """
    recipe = as_recipe(spec_or_recipe)
    model = _quantize(model, recipe, calibration, tokenizer, device, show_progress, checkpoint_dir)
    if recipe.tied_head == "share":
        share_quantized_head(model)
    else:
        untie_quantized_head(model)
    _own_float_tensors(model)
    return model


def _own_float_tensors(model: nn.Module) -> None:
    """Copy the tensors that stay float out of the checkpoint file.

    ``lowbit.load`` reads safetensors zero-copy, so the embedding, norms and head still point into the
    file's memory mapping, and keep every page of the float checkpoint resident (RSS) after the layers
    that held most of it were quantized. Copying the few remaining tensors lets the mapping go.
    """
    if getattr(model, "lowbit_source", None) is None:
        return
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.clone()


def _quantize(model: nn.Module, recipe: QuantRecipe, calibration: "CalibConfig | None", tokenizer: Any,
              device: str, show_progress: bool, checkpoint_dir: Any = None) -> nn.Module:
    if not recipe.streams:
        from lowbit.algorithms.calib_data import CalibConfig
        from lowbit.algorithms.weight_only import method_config

        options = method_config(recipe)
        needs_data = recipe.method != "llm-int8" and not getattr(options, "act_dynamic", False)
        if tokenizer is None and needs_data:
            tokenizer = load_tokenizer(model)
        calibration = calibration or CalibConfig()
        if recipe.method in ("gptq", "awq"):
            from lowbit.algorithms.ptq import quantize_calibrated

            return quantize_calibrated(model, recipe, tokenizer, calibration, device=device,
                                       show_progress=show_progress, checkpoint_dir=checkpoint_dir)
        from lowbit.algorithms.w8a8 import quantize_with_activations

        return quantize_with_activations(model, recipe, options, tokenizer, calibration, device=device,
                                         show_progress=show_progress)
    targets = select_targets(model, recipe)
    check_target_shapes(model, targets)
    quantize_weight = weight_quantizer(recipe)
    for name in progress(targets, desc="quantize", enabled=show_progress, unit="layer"):
        module = model.get_submodule(name)
        qweight = quantize_weight(float_weight(module), targets[name], name)
        set_submodule(model, name, QuantLinear.from_weight(qweight, module.bias).to(module.weight.device))
    model.lowbit_method = recipe.method  # type: ignore[attr-defined]
    return model


def load_tokenizer(model: nn.Module) -> Any:
    """The tokenizer stored beside the model's weights (``model.lowbit_source``)."""
    from lowbit.errors import LowbitError

    source = getattr(model, "lowbit_source", None)
    if source is None:
        raise LowbitError("no tokenizer given and the model was not loaded with lowbit.load (no lowbit_source)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise LowbitError(f"{source}: cannot load a tokenizer from this directory ({exc})") from None


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantLinear` by a float ``nn.Linear`` holding its dequantized weight (in place).

    An embedding shared with a quantized head (:class:`~lowbit.nn.SharedQuantEmbedding`) becomes a float
    ``nn.Embedding`` tied to the dequantized head again.
    """
    from lowbit.models.targets import shared_embeddings

    shared = shared_embeddings(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            device = module.bias.device if module.bias is not None else getattr(module, "qdata").device
            set_submodule(model, name, module.dequantize().to(device))
    for emb_name, head_name in shared.items():
        old = model.get_submodule(emb_name)
        head = model.get_submodule(head_name)
        embedding = nn.Embedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx,
                                 device=head.weight.device, dtype=head.weight.dtype)
        embedding.weight = head.weight  # tied again, as the float model was
        set_submodule(model, emb_name, embedding)
        if getattr(model, "config", None) is not None:
            model.config.tie_word_embeddings = True
    return model
