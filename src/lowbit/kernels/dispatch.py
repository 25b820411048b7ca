"""Pick the linear kernel for a stored weight by (format, device, activation mode).

Weight-only layers (no :class:`~lowbit.formats.act.ActSpec`) use :class:`WeightKernel` families
(kernels/base.py): every registered family that runs on the device and ``supports`` the weight is a
candidate, the highest ``priority`` wins, and the reference (dequantize + float matmul) is the
fallback. Families are imported lazily the first time a device type is seen (Triton only on CUDA),
so importing lowbit never builds or loads a compiled kernel.

Layers that also quantize their input use ``ActLinearKernel``s (mode ``"act"``, or ``"outlier"`` for
LLM.int8), registered with :func:`register` and falling back to ``reference.linear_w8a8``.

``LOWBIT_KERNEL=<name>`` (environment) or :func:`force_kernel` pins the weight-only family by name
(``reference``, ``cpu``, ``triton`` …) for tests and benchmarks; a pinned family that does not
support a weight falls back to the reference.
"""

from __future__ import annotations

import importlib
import os
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Union

import torch

from lowbit.formats.act import ActSpec
from lowbit.kernels import cpu, reference
from lowbit.kernels.base import PreparedLinear, WeightKernel
from lowbit.tensor import QuantizedWeight

LinearKernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None"], torch.Tensor]
# (x, weight, bias, act_spec, input_scale, input_zero) → y
ActLinearKernel = Callable[[torch.Tensor, QuantizedWeight, "torch.Tensor | None", ActSpec,
                            "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
Kernel = Union[LinearKernel, ActLinearKernel]
Supports = Callable[[QuantizedWeight, "ActSpec | None"], bool]

REFERENCE = WeightKernel(
    name="reference", device_types=("*",), supports=lambda weight: True, prepare=lambda weight: weight,
    apply=lambda x, weight, bias: reference.linear(x, weight, bias),
    dequantize=lambda weight, dtype: weight.dequantize(dtype), priority=-1)

_WEIGHT_KERNELS: list[WeightKernel] = []
# device type → modules that register kernel families for it when imported
_LAZY_FAMILIES: dict[str, tuple[str, ...]] = {"cpu": ("lowbit.kernels.cpu_lowbit",),
                                              "cuda": ("lowbit.kernels.triton",)}
_LOADED: set[str] = set()
_forced: str | None = None


class _Entry(NamedTuple):
    kernel: Kernel
    supports: Supports | None


# (format, device type, activation mode) → activation-quantizing kernel
_KERNELS: dict[tuple[str, str, str | None], _Entry] = {}


def act_mode(act_spec: ActSpec | None) -> str | None:
    """None (weight-only), ``"act"`` (quantized activations) or ``"outlier"`` (LLM.int8)."""
    if act_spec is None:
        return None
    return "outlier" if act_spec.outlier_threshold is not None else "act"


def register(fmt: str, device_type: str, kernel: Kernel, act: str | None = None,
             supports: Supports | None = None) -> None:
    """Register an activation-quantizing kernel (``act`` = ``"act"`` or ``"outlier"``)."""
    if act is None:
        raise ValueError("weight-only kernels are registered with register_weight_kernel(WeightKernel)")
    _KERNELS[(fmt, device_type, act)] = _Entry(kernel, supports)


def register_weight_kernel(kernel: WeightKernel) -> None:
    """Add (or replace, by name) a weight-only kernel family."""
    _WEIGHT_KERNELS[:] = [k for k in _WEIGHT_KERNELS if k.name != kernel.name]
    _WEIGHT_KERNELS.append(kernel)


def weight_kernels(device_type: str = "cpu") -> list[WeightKernel]:
    """The registered weight-only families, after importing those registered lazily for ``device_type``."""
    _load_families(device_type)
    return [REFERENCE, *_WEIGHT_KERNELS]


def linear_kernel(weight: QuantizedWeight, device: torch.device, act_spec: ActSpec) -> ActLinearKernel:
    """The activation-quantizing kernel for ``weight`` with input spec ``act_spec`` on ``device``."""
    mode = act_mode(act_spec)
    entry = _KERNELS.get((weight.spec.format, device.type, mode))
    if entry is not None and (entry.supports is None or entry.supports(weight, act_spec)):
        return entry.kernel
    return reference.linear_w8a8


def select_weight_kernel(weight: QuantizedWeight, device: torch.device | str) -> WeightKernel:
    """The weight-only kernel family that will run ``weight`` on ``device``."""
    device_type = torch.device(device).type
    _load_families(device_type)
    name = _forced or os.environ.get("LOWBIT_KERNEL") or None
    candidates = [k for k in _WEIGHT_KERNELS
                  if (name is None or k.name == name)
                  and (device_type in k.device_types or "*" in k.device_types) and _supports(k, weight)]
    if not candidates:
        return REFERENCE
    return max(candidates, key=lambda k: k.priority)


def prepare_weight(weight: QuantizedWeight, device: torch.device | str) -> PreparedLinear:
    """Select a kernel for ``weight`` (already on ``device``) and repack it for that kernel, once."""
    kernel = select_weight_kernel(weight, device)
    try:
        state = kernel.prepare(weight)
    except Exception as err:  # a fast kernel that cannot take this weight must not break inference
        if kernel is REFERENCE:
            raise
        warnings.warn(f"lowbit: kernel {kernel.name!r} could not prepare a {weight.spec.describe()} "
                      f"weight of shape {weight.shape} ({err}); using the reference kernel", stacklevel=2)
        kernel, state = REFERENCE, weight
    return PreparedLinear(kernel, state, weight)


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Repack every QuantLinear of ``model`` for the kernel of the device its weights are on."""
    from lowbit.nn.quant_linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare_kernel()
    return model


@contextmanager
def force_kernel(name: str | None) -> Iterator[None]:
    """Within the block, weight-only layers prepared anew use the family ``name`` where it applies.

    Layers that already cached a prepared weight keep it: call ``QuantLinear.reset_kernel()`` (or
    :func:`reset_model`) to re-select.
    """
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def reset_model(model: torch.nn.Module) -> None:
    """Drop every QuantLinear's prepared kernel state (the next forward selects and repacks again)."""
    from lowbit.nn.quant_linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.reset_kernel()


def _supports(kernel: WeightKernel, weight: QuantizedWeight) -> bool:
    try:
        return bool(kernel.supports(weight))
    except Exception:  # noqa: BLE001 - a buggy predicate must not break inference
        return False


def _load_families(device_type: str) -> None:
    for module_name in _LAZY_FAMILIES.get(device_type, ()):
        if module_name in _LOADED:
            continue
        _LOADED.add(module_name)
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # that family is not part of this installation
            warnings.warn(f"lowbit: fast {device_type} kernels need the package {err.name!r} (pip install "
                          f"{err.name}); using the reference kernel", stacklevel=3)
        except Exception as err:  # noqa: BLE001 - e.g. no compiler, old driver
            warnings.warn(f"lowbit: kernels {module_name} unavailable ({err}); using the reference", stacklevel=3)


for _mode in ("act", "outlier"):
    register("int", "cpu", cpu.linear_int8, act=_mode, supports=cpu.supports_int8)
