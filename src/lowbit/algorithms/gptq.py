"""GPTQ (Frantar et al. 2022): quantize a weight column by column, compensating each column's error
on the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

Pure functions over (weight, Hessian, spec); the layer-by-layer runner feeds them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lowbit.errors import InvalidSpecError
from lowbit.formats import primitives as P
from lowbit.formats.codecs import int_qparams
from lowbit.formats.spec import QuantSpec
from lowbit.tensor import QuantizedWeight


class HessianAccumulator:
    """H = 2/n · Σ xᵀx over the n input rows a linear layer sees (x: [..., in_features])."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)  # [n, K]
        if not torch.isfinite(x).all():
            raise FloatingPointError("calibration activations contain NaN/Inf")
        n = x.shape[0]
        self.hessian *= self.rows / (self.rows + n)
        self.rows += n
        x = x * (2.0 / self.rows) ** 0.5
        self.hessian.addmm_(x.t(), x)


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.05          # fraction of mean(diag(H)) added to the diagonal (GPTQModel's default)
    block_size: int = 128       # columns per lazy batch update
    act_order: bool = True      # process columns by decreasing Hessian diagonal (static groups: no runtime cost)
    true_sequential: bool = True  # quantize a block's layers stage by stage (see calibrate.run_layer_by_layer)
    mse_clip: bool = True       # choose each group's range by a shrink grid minimising |w − q(w)|^2.4
    mse_grid: int = 80
    mse_max_shrink: float = 0.8
    max_damp_retries: int = 6


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, config: GPTQConfig = GPTQConfig(),
                  name: str = "weight", *, consume_hessian: bool = False) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [N, K] (float) given the input Hessian ``hessian`` [K, K].

    Integer formats only (per-channel or per-group). With ``act_order`` the group parameters are
    fixed from the original weight ("static groups"), so the stored model needs no permutation.
    """
    if spec.format != "int" or spec.granularity == "tensor":
        raise InvalidSpecError(f"{name}: GPTQ needs an int format with per-channel or per-group scales, got {spec.describe()}")
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    g = spec.group_size if spec.granularity == "group" else k
    if k % g:
        P.grouped(w, spec, name)  # raises the standard ShapeError
    h = hessian.to(w.device, torch.float32)
    if h is hessian and not consume_hessian:
        h = h.clone()  # ``consume_hessian``: the caller's Hessian is overwritten instead of copied (K×K saved)
    del hessian
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static_scale = static_zero = None
    if config.act_order:
        static_scale, static_zero = _group_qparams(w, spec, config, name)  # [N, K/g] from the original weight
    perm = torch.argsort(torch.diag(h), descending=True) if config.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, config, name)
    del h

    q_all = torch.zeros_like(w)
    scale = torch.zeros(n, k // g, dtype=torch.float32, device=w.device)
    zero = torch.zeros_like(scale)
    if static_scale is not None:
        scale, zero = static_scale, static_zero
    qmin, qmax = P.int_range(spec.bits, spec.symmetric)
    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            original = int(perm[column]) if perm is not None else column
            group = original // g
            if static_scale is None and original % g == 0:
                # dynamic groups: parameters from the already error-compensated weights of this group
                cols = w1[:, i : i + g] if i + g <= i2 - i1 else torch.cat([w1[:, i:], w[:, i2 : column + g]], 1)
                s, z = _group_qparams(cols, spec.replace(granularity="channel", group_size=None), config, name)
                scale[:, group], zero[:, group] = s[:, 0], z[:, 0]
            s, z = scale[:, group], zero[:, group]
            col = w1[:, i]
            q = (torch.clamp(torch.round(col / s + z), qmin, qmax) - z) * s
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    return QuantizedWeight.from_qparams(q_all, spec, scale, zero, name)


def _group_qparams(w: torch.Tensor, spec: QuantSpec, config: GPTQConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero [R, G] for ``w``: the min/max range, or (``mse_clip``) the shrunk range with least error."""
    scale, zero = int_qparams(w, spec, name)
    if not config.mse_clip:
        return scale, zero
    x = P.grouped(w.float(), spec, name)  # [R, G, g]
    qmin, qmax = P.int_range(spec.bits, spec.symmetric)

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = (torch.clamp(torch.round(x / s.unsqueeze(-1) + z.unsqueeze(-1)), qmin, qmax) - z.unsqueeze(-1)) * s.unsqueeze(-1)
        return (q - x).abs().pow(2.4).sum(-1)

    best = error(scale, zero)
    steps = int(config.mse_max_shrink * config.mse_grid)
    for i in range(1, steps):
        ratio = 1 - i / config.mse_grid
        s_try, z_try = int_qparams((x * ratio).reshape(w.shape), spec, name)
        err = error(s_try, z_try)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s_try, scale)
        zero = torch.where(better, z_try, zero)
    return scale, zero


def _inverse_hessian_cholesky(h: torch.Tensor, config: GPTQConfig, name: str) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening; raises the dampening (with a warning) if H is not PD.

    ``h`` (a private copy) is dampened in place; at most three K×K matrices are alive at once.
    """
    damp = config.damp
    mean_diag = torch.mean(torch.diag(h)).item()
    added = 0.0
    for attempt in range(config.max_damp_retries + 1):
        h.diagonal().add_(damp * mean_diag - added)
        added = damp * mean_diag
        try:
            lower = torch.linalg.cholesky(h)
        except torch.linalg.LinAlgError:
            if attempt == config.max_damp_retries:
                raise
            new = damp * 10
            warnings.warn(f"{name}: Hessian not positive definite with damp={damp:g}; retrying with damp={new:g}")
            damp = new
            continue
        del h
        inverse = torch.cholesky_inverse(lower)
        del lower
        return torch.linalg.cholesky(inverse, upper=True)
    raise AssertionError("unreachable")


def gptq_on_grid(weight: torch.Tensor, hessian: torch.Tensor, grid: QuantizedWeight,
                 config: GPTQConfig = GPTQConfig(), name: str = "weight") -> QuantizedWeight:
    """Store ``weight`` [N, K] on an existing weight's quantization grid (its scales, zero-points and
    codebook kept), choosing each code by GPTQ's error-compensated rounding under ``hessian`` [K, K].

    For folding an update into a quantized weight (a merged adapter): plain rounding onto the grid
    drops any change smaller than half a step; compensating each column's rounding error on the
    columns not yet rounded keeps the layer's *output* close to ``weight``'s. Int, NF4 and FP4 grids.
    """
    from lowbit.formats.codebooks import codebook
    from lowbit.formats.codecs import encode_on_grid

    spec = grid.spec
    if spec.format not in ("int", "nf4", "fp4") or spec.granularity == "tensor" and spec.format != "int":
        raise InvalidSpecError(f"{name}: GPTQ on a fixed grid supports int/nf4/fp4 formats, got {spec.describe()}")
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    g = spec.group_size if spec.granularity == "group" else k
    scale = grid.scale.to(w.device).reshape(n, -1)  # [N, G] (per-tensor: one column, broadcast)
    if spec.format == "int":
        zero = grid.zero_point.to(w.device, torch.float32).reshape(n, -1)
        qmin, qmax = P.int_range(spec.bits, spec.symmetric)

        def round_column(col: torch.Tensor, j: int) -> torch.Tensor:
            s, z = scale[:, min(j // g, scale.shape[1] - 1)], zero[:, min(j // g, zero.shape[1] - 1)]
            return (torch.clamp(torch.round(col / s + z), qmin, qmax) - z) * s
    else:
        book = codebook(spec.format).to(w.device)

        def round_column(col: torch.Tensor, j: int) -> torch.Tensor:
            s = scale[:, j // g]
            nearest = (col.div(s).clamp(-1, 1).unsqueeze(1) - book.unsqueeze(0)).abs().argmin(1)
            return book[nearest] * s

    h = hessian.to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True) if config.act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, config, name)
    q_all = torch.zeros_like(w)
    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=w.device)
        for i in range(i2 - i1):
            q = round_column(w1[:, i], int(perm[i1 + i]))
            q_all[:, i1 + i] = q
            err1[:, i] = (w1[:, i] - q) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= err1[:, i : i + 1] * hinv[i1 + i, i1 + i : i2].unsqueeze(0)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q_all = q_all[:, torch.argsort(perm)]
    tensors = {key: value.to(w.device) for key, value in grid.tensors.items()}
    return QuantizedWeight(spec, grid.shape, encode_on_grid(q_all, tensors, spec, name))
