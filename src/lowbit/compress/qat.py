"""Quantization-aware training: swap the linear layers for :class:`~lowbit.nn.fake_quant.FakeQuantLinear`
(ranges from RTN or GPTQ), train with lowbit's trainer, convert to packed :class:`~lowbit.nn.QuantLinear`.

    targets = prepare_qat(model, QuantSpec.int_(2, 64, symmetric=False), init="gptq", tokenizer=tok)
    Trainer(model, TrainConfig(steps=200, lr=1e-4), train_data).train()
    convert_qat(model)          # exact: the packed model computes what training simulated
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import QuantSpec
from lowbit.nn.fake_quant import FakeQuantLinear, check_spec
from lowbit.nn.quant_linear import QuantLinear

INITS = ("rtn", "gptq")


def prepare_qat(model: nn.Module, spec: QuantSpec, *, init: str = "rtn", tokenizer: Any = None, calib: Any = None,
                device: str | torch.device = "cpu", show_progress: bool = False) -> list[str]:
    """Replace the layers ``lowbit quantize`` would quantize by FakeQuantLinear (in place); everything else is frozen.

    ``init="gptq"`` starts from the GPTQ model (its error-compensated weights, scales and zero-points, computed on
    ``calib``), ``"rtn"`` from the float weights with round-to-nearest ranges. Returns the layer names.
    """
    from lowbit.models.targets import check_target_shapes, select_targets, set_submodule
    from lowbit.recipe import QuantRecipe

    if init not in INITS:
        raise InvalidSpecError(f"QAT init {init!r}: choose one of {', '.join(INITS)}")
    if any(isinstance(m, (QuantLinear, FakeQuantLinear)) for m in model.modules()):
        raise InvalidSpecError("QAT starts from the float model (this one is already quantized)")
    check_spec(spec)
    recipe = QuantRecipe(spec, "gptq" if init == "gptq" else "rtn")
    targets = list(select_targets(model, recipe))
    if not targets:
        raise InvalidSpecError("the model has no linear layer to train")
    check_target_shapes(model, dict.fromkeys(targets, spec))
    start: dict[str, QuantLinear] = {}
    if init == "gptq":
        from lowbit.algorithms.calib_data import CalibConfig
        from lowbit.algorithms.ptq import quantize_calibrated

        quantized = quantize_calibrated(copy.deepcopy(model), recipe, tokenizer, calib or CalibConfig(), device=device,
                                        show_progress=show_progress)
        start = {n: quantized.get_submodule(n) for n in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if name in start:
            fq = FakeQuantLinear.from_quantized(start[name].weight, getattr(module, "bias", None))
        else:
            fq = FakeQuantLinear.from_linear(module, spec, name)
        set_submodule(model, name, fq.to(module.weight.device))
    return targets


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by the packed QuantLinear that computes the same (in place)."""
    from lowbit.models.targets import set_submodule

    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            set_submodule(model, name, module.convert())
    model.lowbit_method = "qat"  # type: ignore[attr-defined]
    return model
