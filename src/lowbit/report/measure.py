"""Per-layer weight error, quantization grids of one group, and representative layers for the histograms."""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.formats.primitives import scale_shape
from lowbit.formats.spec import QuantSpec
from lowbit.models.targets import float_weight, linear_dims
from lowbit.tensor import QuantizedWeight

MAX_HIST_VALUES = 8192
_FP8_DTYPES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F of two [out, in] tensors (0 when both are zero, inf when only W is)."""
    w, a = weight.float(), approx.float()
    num = torch.linalg.vector_norm(w - a).item()
    den = torch.linalg.vector_norm(w).item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def reference_weight(reference: nn.Module, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The float weight [out, in] of layer ``name`` in ``reference``, checked against ``shape``."""
    where = getattr(reference, "lowbit_source", None) or "the reference"
    try:
        module = reference.get_submodule(name)
    except AttributeError:
        raise UnsupportedModelError(f"{where} has no layer {name}: it is not the model this one was quantized from "
                                    "(pass the right --reference)") from None
    w = float_weight(module).float()
    if tuple(w.shape) != tuple(shape):
        raise UnsupportedModelError(f"{name}: its weight in {where} is {tuple(w.shape)}, the quantized layer's "
                                    f"{tuple(shape)}: the reference is not the model this one was quantized from")
    return w


def group_columns(spec: QuantSpec, shape: tuple[int, int], group: int) -> tuple[int, int]:
    """Input columns [start, end) of scale group ``group`` within a row."""
    if spec.granularity == "group" and spec.group_size:
        return group * spec.group_size, (group + 1) * spec.group_size
    return 0, shape[1]


def group_errors(weight: torch.Tensor, approx: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Relative error of every scale group: [R, G] (per-tensor specs: [1, 1])."""
    n, k = weight.shape
    rows, groups = scale_shape((n, k), spec)
    w = weight.float().reshape(rows, groups, -1)
    d = (weight.float() - approx.float()).reshape(rows, groups, -1)
    return torch.linalg.vector_norm(d, dim=-1) / torch.linalg.vector_norm(w, dim=-1).clamp(min=1e-30)


def median_group(weight: torch.Tensor, approx: torch.Tensor, spec: QuantSpec) -> tuple[int, int, float]:
    """(row, group, error) of the scale group with the median relative error: a typical group."""
    errs = group_errors(weight, approx, spec)
    flat = errs.reshape(-1)
    order = torch.argsort(flat)
    idx = int(order[(flat.numel() - 1) // 2])
    return idx // errs.shape[1], idx % errs.shape[1], float(flat[idx])


def grid_values(qweight: QuantizedWeight, row: int, group: int) -> list[float]:
    """The distinct values the codes of scale group (row, group) dequantize to, ascending.

    int: scale·(q − z) over every code q; nf4/fp4: codebook·absmax; fp8: every finite float8 value ×
    scale; fp16/bf16 (no grid): empty.
    """
    spec = qweight.spec
    if not spec.has_scale:
        return []
    scale_t = qweight.scale
    assert scale_t is not None
    r = row if spec.granularity != "tensor" else 0
    g = group if spec.granularity == "group" else 0
    scale = float(scale_t[r, g])
    if spec.format == "int":
        zero_t = qweight.zero_point
        zero = float(zero_t[r, g]) if zero_t is not None else 0.0
        if spec.symmetric:
            codes = torch.arange(-(1 << (spec.bits - 1)), 1 << (spec.bits - 1), dtype=torch.float64)
        else:
            codes = torch.arange(0, 1 << spec.bits, dtype=torch.float64)
        values = (codes - zero) * scale
    elif spec.format in ("nf4", "fp4"):
        from lowbit.formats.codebooks import codebook

        values = codebook(spec.format).double() * scale
    else:
        dtype = getattr(torch, _FP8_DTYPES[spec.format])
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).double()
        values = codes[torch.isfinite(codes)] * scale
    return sorted({float(v) for v in values.tolist()})


def histogram_values(weight: torch.Tensor, spec: QuantSpec, row: int, group: int) -> list[float]:
    """Float weights of scale group (row, group) (a deterministic sample of ≤ 8192 for large groups)."""
    if spec.granularity == "tensor":
        flat = weight.reshape(-1)
    else:
        start, end = group_columns(spec, (int(weight.shape[0]), int(weight.shape[1])), group)
        flat = weight[row, start:end]
    if flat.numel() > MAX_HIST_VALUES:
        idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:MAX_HIST_VALUES]
        flat = flat[idx]
    return flat.float().tolist()


def representative_layers(errors: dict[str, float], count: int = 3) -> list[tuple[str, str]]:
    """(layer, role) for the worst, median and best error layers (fewer when there are fewer layers)."""
    ranked = sorted((e, n) for n, e in errors.items() if math.isfinite(e))
    if not ranked:
        return []
    picks = [(ranked[-1][1], "worst"), (ranked[(len(ranked) - 1) // 2][1], "median"), (ranked[0][1], "best")]
    out: list[tuple[str, str]] = []
    for name, role in picks:
        if name not in [n for n, _ in out]:
            out.append((name, role))
    return out[:count]


def layer_params(module: nn.Module) -> int:
    in_features, out_features = linear_dims(module)
    return in_features * out_features
