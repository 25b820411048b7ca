"""Pick the linear kernel for a (format, device, activation mode) triple.

Weight-only layers (no :class:`~lowbit.formats.act.ActSpec`) use ``LinearKernel``s; layers that
also quantize their input use ``ActLinearKernel``s (mode ``"act"``, or ``"outlier"`` for LLM.int8).
A registered kernel may come with a ``supports(weight, act_spec)`` predicate; whatever is not
supported falls back to the pure-torch reference in kernels/reference.py.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch

from lowbit.formats.act import ActSpec
from lowbit.kernels import cpu, reference
from lowbit.tensor import QuantizedWeight

LinearKernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]
# (x, weight, bias, act_spec, input_scale, input_zero) → y
ActLinearKernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None", ActSpec,
                            "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
Kernel = Union[LinearKernel, ActLinearKernel]
Supports = Callable[[QuantizedWeight, "ActSpec | None"], bool]


class _Entry(NamedTuple):
    kernel: Kernel
    supports: Supports | None


# (format, device type, activation mode) → kernel; filled by kernel modules as they are added.
_KERNELS: dict[tuple[str, str, str | None], _Entry] = {}


def act_mode(act_spec: ActSpec | None) -> str | None:
    """None (weight-only), ``"act"`` (quantized activations) or ``"outlier"`` (LLM.int8)."""
    if act_spec is None:
        return None
    return "outlier" if act_spec.outlier_threshold is not None else "act"


def register(fmt: str, device_type: str, kernel: Kernel, act: str | None = None,
             supports: Supports | None = None) -> None:
    _KERNELS[(fmt, device_type, act)] = _Entry(kernel, supports)


def linear_kernel(weight: QuantizedWeight, device: torch.device, act_spec: ActSpec | None = None) -> Kernel:
    """The kernel for ``weight`` on ``device``: a ``LinearKernel`` when ``act_spec`` is None, else an
    ``ActLinearKernel``."""
    mode = act_mode(act_spec)
    entry = _KERNELS.get((weight.spec.format, device.type, mode))
    if entry is not None and (entry.supports is None or entry.supports(weight, act_spec)):
        return entry.kernel
    return reference.linear if mode is None else reference.linear_w8a8


for _mode in ("act", "outlier"):
    register("int", "cpu", cpu.linear_int8, act=_mode, supports=cpu.supports_int8)
