"""Calibration-free weight quantizers (RTN, HQQ): one weight in, one QuantizedWeight out.

These need no activations, so they run tensor by tensor while streaming a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
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
    unknown = sorted(set(options) - names, key=str)
    if unknown:
        raise InvalidSpecError(f"unknown {recipe.method} option(s) {unknown}; allowed: {sorted(names)}")
    for f in dataclasses.fields(cls):
        if f.name in options:
            _check_option(recipe.method, f.name, str(f.type), options[f.name])
    return cls(**options)


_OPTION_TYPES: dict[str, tuple[type, ...]] = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_option(method: str, name: str, annotation: str, value: Any) -> None:
    """A recipe option of a plain type (``bool``/``int``/``float``/``str``) must have it; numbers must be finite."""
    types = _OPTION_TYPES.get(annotation)
    if types is None:
        return
    ok = isinstance(value, types) and (annotation == "bool" or not isinstance(value, bool))
    if ok and annotation == "float":
        try:
            ok = math.isfinite(float(value))
        except OverflowError:  # an integer past the float range
            ok = False
    if not ok:
        text = repr(value)
        raise InvalidSpecError(f"{method} option {name} must be {'a finite ' if annotation == 'float' else 'a '}"
                               f"{annotation}, got {text if len(text) <= 40 else text[:37] + '...'}")


def weight_quantizer(recipe: QuantRecipe) -> WeightQuantizer:
    """The per-weight quantizer of a calibration-free method."""
    if recipe.method == "rtn":
        return QuantizedWeight.from_float
    if recipe.method == "hqq":
        from lowbit.algorithms.hqq import hqq_quantize

        config = method_config(recipe)
        return lambda weight, spec, name: hqq_quantize(weight, spec, config, name)
    raise InvalidSpecError(f"method {recipe.method} needs calibration data; it is not a per-weight quantizer")
