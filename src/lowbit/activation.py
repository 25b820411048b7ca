"""Activation quantization: ``prepare`` → run calibration batches → ``convert`` (W8A8), and LLM.int8().

The flow PyTorch users know from ``torch.ao.quantization``::

    lowbit.activation.prepare(model, ActSpec.static(symmetric=False))  # observers on the linears' inputs
    for batch in calibration_data:
        model(**batch)                                                  # the observers record the inputs
    lowbit.activation.convert(model)                                    # int8 weights + input scales

``convert`` installs :class:`~lowbit.nn.QuantLinear` layers carrying the ``act_spec`` (and, for
static specs, the calibrated ``input_scale``/``input_zero`` buffers); they save and load like any
other lowbit model. Dynamic act specs need no calibration: ``convert`` right after ``prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from lowbit.algorithms.calib_data import CalibConfig, calibration_batches
from lowbit.algorithms.weight_only import weight_quantizer
from lowbit.errors import LowbitError
from lowbit.formats.act import DEFAULT_OUTLIER_THRESHOLD, ActSpec
from lowbit.formats.spec import QuantSpec
from lowbit.models.targets import check_target_shapes, float_weight, select_targets, set_submodule
from lowbit.nn.observers import Observer, make_observer
from lowbit.nn.quant_linear import QuantLinear
from lowbit.progress import progress
from lowbit.recipe import QuantRecipe, as_recipe, name_matches

#: W8A8 weights: int8, one symmetric scale per output channel (what int8 GEMMs with per-channel scaling take).
W8A8_WEIGHT_SPEC = QuantSpec.int_(8, None, symmetric=True, scale_dtype="float32")
#: Static W8A8 activations: int8 per-tensor, *asymmetric*, min-max calibrated. Asymmetric matters:
#: FFN down-projection inputs are post-GELU (in [-0.17, 25] on MiniLM) and a symmetric grid wastes
#: half its codes on them (MiniLM embedding cosine 0.982 symmetric vs 0.993 asymmetric). Clipping
#: observers do not help there: the large values are systematic outlier features, not noise
#: (percentile 99.99: 0.93; MSE: 0.993, as min-max).
STATIC_ACT_SPEC = ActSpec.static("minmax", symmetric=False)
#: Dynamic W8A8 activations: int8, one symmetric scale per token.
DYNAMIC_ACT_SPEC = ActSpec.dynamic_per_token()

ActOverrides = Sequence[tuple[str, "ActSpec | None"]]


@dataclass
class _Calibration:
    """What ``prepare`` attached to a model (kept as ``model.lowbit_act_calibration``)."""

    recipe: QuantRecipe
    weight_specs: dict[str, QuantSpec]
    act_specs: dict[str, ActSpec | None]
    observers: dict[str, Observer]
    handles: list[Any] = field(default_factory=list)


def prepare(model: nn.Module, act_spec: ActSpec = STATIC_ACT_SPEC,
            recipe_or_spec: QuantSpec | QuantRecipe | dict[str, Any] = W8A8_WEIGHT_SPEC, *,
            act_overrides: ActOverrides | None = None) -> nn.Module:
    """Attach activation observers to the linear layers the recipe quantizes (in place).

    Args:
        model: a float model (Hugging Face or any ``nn.Module``).
        act_spec: how every target layer's input is quantized.
        recipe_or_spec: the weights' spec, or a :class:`QuantRecipe` (skip/include/overrides; its
            method must be calibration-free: ``rtn`` or ``hqq``). ``lm_head`` is skipped by default.
        act_overrides: ``(pattern, act_spec or None)`` pairs, first match wins (patterns as in
            recipes); ``None`` keeps that layer's activations in float (its weight is still quantized).
    Returns:
        the same model; run calibration batches through it, then call :func:`convert`.
    """
    if hasattr(model, "lowbit_act_calibration"):
        raise LowbitError("model is already prepared for activation calibration; call convert() first")
    recipe = as_recipe(recipe_or_spec)
    weight_quantizer(recipe)  # fail now, not after calibration, on a method that needs calibration data
    targets = select_targets(model, recipe)
    check_target_shapes(model, targets)
    acts = {name: _act_spec_for(name, act_spec, act_overrides or ()) for name in targets}
    state = _Calibration(recipe, targets, acts, {})
    for name, spec in acts.items():
        if spec is not None and not spec.dynamic:
            observer = state.observers[name] = make_observer(spec, name)
            hook = model.get_submodule(name).register_forward_pre_hook(
                lambda module, args, observer=observer: observer.observe(args[0]))
            state.handles.append(hook)
    model.lowbit_act_calibration = state  # type: ignore[attr-defined]
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace the prepared layers by :class:`QuantLinear` with their act spec and calibrated
    input scale/zero; removes the observers. Returns the same model."""
    state: _Calibration | None = getattr(model, "lowbit_act_calibration", None)
    if state is None:
        raise LowbitError("model was not prepared for activation quantization; call prepare() first")
    unobserved = [name for name, observer in state.observers.items() if not observer.batches]
    if unobserved:
        shown = ", ".join(unobserved[:5]) + (" …" if len(unobserved) > 5 else "")
        raise LowbitError(f"{len(unobserved)} layer(s) saw no calibration data: {shown}; run calibration batches "
                          "through the model between prepare() and convert()")
    quantize_weight = weight_quantizer(state.recipe)
    for name, spec in state.weight_specs.items():
        module = model.get_submodule(name)
        act = state.act_specs[name]
        scale = zero = None
        if name in state.observers:
            assert act is not None
            scale, zero = state.observers[name].qparams(act.bits, act.symmetric)
        qweight = quantize_weight(float_weight(module), spec, name)
        qlinear = QuantLinear.from_weight(qweight, module.bias, act_spec=act, input_scale=scale, input_zero=zero)
        set_submodule(model, name, qlinear.to(module.weight.device))
    unprepare(model)  # the observers' hooks sat on the float modules just replaced
    model.lowbit_method = _method_name(state.act_specs.values())  # type: ignore[attr-defined]
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: torch.Tensor, *, batch_size: int = 8, show_progress: bool = False) -> None:
    """Run token windows ``batches`` [samples, seq_len] (int64) through ``model`` on its device."""
    device = next(model.parameters()).device
    for start in progress(range(0, batches.shape[0], batch_size), desc="calibrate", enabled=show_progress,
                          unit="batch"):
        ids = batches[start : start + batch_size].to(device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def quantize_w8a8(model: nn.Module, tokenizer: Any = None, calib: CalibConfig | None = None, *,
                  act_spec: ActSpec = STATIC_ACT_SPEC,
                  weight_spec: QuantSpec | QuantRecipe | dict[str, Any] = W8A8_WEIGHT_SPEC,
                  act_overrides: ActOverrides | None = None, device: str | torch.device | None = None,
                  batch_size: int = 8, show_progress: bool = False) -> nn.Module:
    """W8A8 in one call: :func:`prepare` → calibration batches → :func:`convert` (in place).

    Args:
        tokenizer: cuts the calibration text (static act specs only; default: loaded from
            ``model.lowbit_source``).
        calib: calibration data (default: the built-in demo corpus).
        act_spec, weight_spec, act_overrides: as for :func:`prepare`.
        device: where the calibration passes run; the model is moved there (default: where it is).
    Returns:
        the same model.
    """
    prepare(model, act_spec, weight_spec, act_overrides=act_overrides)
    state: _Calibration = model.lowbit_act_calibration  # type: ignore[attr-defined]
    try:
        if state.observers:
            if tokenizer is None:
                from lowbit.quantize import load_tokenizer

                tokenizer = load_tokenizer(model)
            if device is not None:
                model.to(device)
            calibrate(model, calibration_batches(tokenizer, calib or CalibConfig()), batch_size=batch_size,
                      show_progress=show_progress)
        return convert(model)
    except BaseException:
        unprepare(model)
        raise


def quantize_llm_int8(model: nn.Module, threshold: float = DEFAULT_OUTLIER_THRESHOLD,
                      weight_spec: QuantSpec | QuantRecipe | dict[str, Any] = W8A8_WEIGHT_SPEC) -> nn.Module:
    """LLM.int8() (in place, no calibration): int8 per-channel weights; inputs int8 per token, except
    the columns holding any ``|x| > threshold``, which stay in floating point."""
    return convert(prepare(model, ActSpec.llm_int8(threshold), weight_spec))


def unprepare(model: nn.Module) -> nn.Module:
    """Remove the observers :func:`prepare` attached, leaving the model as it was (no-op if none)."""
    state: _Calibration | None = getattr(model, "lowbit_act_calibration", None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        del model.lowbit_act_calibration
    return model


def _act_spec_for(name: str, default: ActSpec, overrides: ActOverrides) -> ActSpec | None:
    for pattern, spec in overrides:
        if name_matches(pattern, name):
            return spec
    return default


def _method_name(act_specs: Any) -> str:
    specs = [s for s in act_specs if s is not None]
    if specs and all(s.outlier_threshold is not None for s in specs):
        return "llm-int8"
    if specs and all(s.dynamic for s in specs):
        return "w8a8-dynamic"
    return "w8a8-static"
