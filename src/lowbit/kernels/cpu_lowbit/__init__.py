"""Fast CPU weight-only kernels: low-bit codes × int8 activations with integer dot products.

Importing this package builds the C++ kernels on first use (``build.py``; cached per machine) and
registers two :class:`~lowbit.kernels.base.WeightKernel` families with the dispatcher:

* ``cpu`` (priority 10): inputs of up to ``INT_MAX_M`` (8) rows — decode — quantize x to int8 per
  32 columns (like llama.cpp's Q8_0) and multiply with the int2/3/4/5/6/8 or nf4/fp4 codes by
  integer dot products: ``vpdpbusd`` (AVX-512 VNNI), AVX-VNNI or AVX2 ``vpmaddubsw``, or a scalar
  fallback, chosen at run time. Larger inputs (prefill, evaluation, calibration) and inputs that
  require grad take the exact path: the weight is dequantized in cache-sized chunks in C++ and
  multiplied with ATen's matmul in x's dtype (as fast as fp32 ``F.linear``). ``LOWBIT_CPU_INT_MAX_M``
  moves the threshold (the integer path is also 5-8× faster for prefill). Used by default on CPU
  for the formats it supports.
* ``cpu_exact`` (priority 5, pick it with ``LOWBIT_KERNEL=cpu_exact`` or
  ``dispatch.force_kernel("cpu_exact")``): the exact path for every batch size.

If the kernels cannot be built (no compiler …) the import raises :class:`BuildError`; the
dispatcher then warns and uses the reference kernel.
"""

from __future__ import annotations

import functools

from lowbit.kernels import dispatch
from lowbit.kernels.base import WeightKernel
from lowbit.kernels.cpu_lowbit import ops
from lowbit.kernels.cpu_lowbit.build import BuildError, load_library
from lowbit.kernels.cpu_lowbit.layout import CpuPrepared, prepare, supports

CPU_KERNEL = WeightKernel(name="cpu", device_types=("cpu",), supports=supports, prepare=prepare, apply=ops.linear,
                          dequantize=ops.dequantize, priority=10)
CPU_EXACT_KERNEL = WeightKernel(name="cpu_exact", device_types=("cpu",), supports=supports,
                                prepare=functools.partial(prepare, int_max_m=0), apply=ops.linear,
                                dequantize=ops.dequantize, priority=5)

dispatch.register_weight_kernel(CPU_KERNEL)
dispatch.register_weight_kernel(CPU_EXACT_KERNEL)

__all__ = ["BuildError", "CPU_EXACT_KERNEL", "CPU_KERNEL", "CpuPrepared", "load_library", "prepare", "supports"]
