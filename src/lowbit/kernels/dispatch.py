"""Pick the linear kernel for a (format, device) pair.

Only the reference kernel exists so far; fast kernels (Triton on GPU, a CPU path) register here
with the formats and device types they handle, and fall back to the reference otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.kernels import reference
from lowbit.tensor import QuantizedWeight

LinearKernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]

# (format, device type) → kernel; filled by kernel modules as they are added.
_KERNELS: dict[tuple[str, str], LinearKernel] = {}


def register(fmt: str, device_type: str, kernel: LinearKernel) -> None:
    _KERNELS[(fmt, device_type)] = kernel


def linear_kernel(weight: QuantizedWeight, device: torch.device) -> LinearKernel:
    return _KERNELS.get((weight.spec.format, device.type), reference.linear)
