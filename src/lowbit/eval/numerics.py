"""Where did the NaN come from? Localise a non-finite model output to the first layer that produced it.

Checking every layer's output on every call costs a reduction per layer; checking the model's output is one
reduction. When that finds NaN/Inf, :func:`check_finite_output` runs the same inputs again with a forward hook
on every leaf module and names the first one (in execution order) whose inputs were finite but whose output
was not — a quantized layer's kernel, a norm, an attention — with its type and, for quantized layers, the
weight format and the kernel that ran it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import NumericalError


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def first_nonfinite_module(model: nn.Module, run: Callable[[], Any]) -> tuple[str, nn.Module] | None:
    """(name, module) of the first leaf module whose output held NaN/Inf on finite inputs during ``run()``."""
    found: list[tuple[str, nn.Module]] = []

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not found and _finite(args) and _finite(kwargs) and not _finite(output):
                found.append((name, module))
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
               if n and not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def describe_module(module: nn.Module) -> str:
    from lowbit.nn.quant_linear import QuantLinear

    if isinstance(module, QuantLinear):
        kernel = getattr(getattr(module, "_prepared", None), "kernel", None)
        name = getattr(kernel, "name", None)
        return f"QuantLinear {module.weight.spec.describe()}" + (f", kernel {name}" if name else "")
    return type(module).__name__


def check_finite_output(model: nn.Module, output: torch.Tensor, rerun: Callable[[], Any], what: str = "logits") -> None:
    """Raise NumericalError naming the first layer that produced NaN/Inf when ``output`` is not finite."""
    if bool(torch.isfinite(output).all()):
        return
    culprit = first_nonfinite_module(model, rerun)
    if culprit is None:
        raise NumericalError(f"the model's {what} hold NaN/Inf, but no single layer produced them from finite "
                             "inputs on a second pass (non-deterministic kernel?)")
    name, module = culprit
    raise NumericalError(f"{name} ({describe_module(module)}): produced NaN/Inf from finite inputs; the model's "
                         f"{what} are not finite. Check this layer's weights (scales) or run it with "
                         "LOWBIT_KERNEL=reference to compare")
