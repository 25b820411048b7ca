"""Triton GPU kernels for quantized linear layers (imported lazily by dispatch for CUDA devices).

Registers, when imported:

* the weight-only family ``"triton"`` (:data:`TRITON_KERNEL`) for ``cuda`` devices: integer weights of
  every width (2…8 bits; symmetric or asymmetric with integer or float zero-points; per-tensor,
  per-channel or any group size; plain or double-quantized scales), nf4/fp4 (with or without double
  quantization) and fp8. ``prepare`` (layout.py) repacks once; ``apply`` (weight_only.py) runs the
  fused dequantize-GEMV split-K kernel for M ≤ 16 rows and the dequantize-GEMM otherwise;
  ``dequantize`` (dequant.py) serves the backward pass;
* the W8A8 kernel (w8a8.py) for int8 weights with quantized activations (mode ``"act"``).

Importing this package without Triton installed raises ModuleNotFoundError for ``triton``; dispatch
then warns once (on a CUDA device) that the reference kernel is used and Triton should be installed. Under ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors (tests).
"""

from __future__ import annotations

import triton  # noqa: F401  (a missing Triton fails here, before anything registers)

from lowbit.kernels import dispatch
from lowbit.kernels.base import WeightKernel
from lowbit.kernels.triton.dequant import dequantize
from lowbit.kernels.triton.layout import TritonWeight, prepare, supports
from lowbit.kernels.triton.w8a8 import linear_w8a8, supports_w8a8
from lowbit.kernels.triton.weight_only import apply

TRITON_KERNEL = WeightKernel(name="triton", device_types=("cuda",), supports=supports, prepare=prepare,
                             apply=apply, dequantize=dequantize, priority=10)

dispatch.register_weight_kernel(TRITON_KERNEL)
dispatch.register("int", "cuda", linear_w8a8, act="act", supports=supports_w8a8)

__all__ = ["TRITON_KERNEL", "TritonWeight", "apply", "dequantize", "linear_w8a8", "prepare", "supports",
           "supports_w8a8"]
