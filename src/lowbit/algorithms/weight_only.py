"""Calibration-free weight quantizers (RTN, HQQ): one weight in, one QuantizedWeight out.

These need no activations, so they run tensor by tensor while streaming a checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import QuantSpec
from lowbit.recipe import QuantRecipe
from lowbit.tensor import QuantizedWeight

WeightQuantizer = Callable[[torch.Tensor, QuantSpec, str], QuantizedWeight]


def method_config(recipe: QuantRecipe) -> Any:
    """The typed options object of the recipe's method (unknown option names are errors)."""
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.algorithms.hqq import HQQConfig
    from lowbit.algorithms.w8a8 import W8A8Options

    classes = {"gptq": GPTQConfig, "awq": AWQConfig, "hqq": HQQConfig, "static": W8A8Options,
               "smoothquant": W8A8Options, "llm-int8": W8A8Options}
    options = dict(recipe.options)
    if recipe.method not in classes:
        if options:
            raise InvalidSpecError(f"method {recipe.method} takes no options; got {sorted(options)}")
        return None
    cls = classes[recipe.method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InvalidSpecError(f"unknown {recipe.method} option(s) {unknown}; allowed: {sorted(names)}")
    return cls(**options)


def weight_quantizer(recipe: QuantRecipe) -> WeightQuantizer:
    """The per-weight quantizer of a calibration-free method."""
    if recipe.method == "rtn":
        return QuantizedWeight.from_float
    if recipe.method == "hqq":
        from lowbit.algorithms.hqq import hqq_quantize

        config = method_config(recipe)
        return lambda weight, spec, name: hqq_quantize(weight, spec, config, name)
    raise InvalidSpecError(f"method {recipe.method} needs calibration data; it is not a per-weight quantizer")
