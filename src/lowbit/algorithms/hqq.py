"""HQQ (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models"): calibration-free.

With the round-to-nearest scale held fixed, HQQ chooses each group's zero-point to minimise a
sparsity-promoting l_p error norm (p < 1) of W − dequant(quant(W)). The l_p term is split off
with an auxiliary error variable W_e (half-quadratic splitting) and the two sub-problems are solved
alternately, each in closed form:

    W_q = clamp(round(W/s + z))              codes for the current zero
    W_r = (W_q − z)·s                        reconstruction
    W_e = shrink_lp(W − W_r, β, p)           generalised soft-thresholding (the l_p proximal step)
    z   = mean_group(W_q − (W − W_e)/s)      least-squares zero given W_q and W_e
    β  ← κ·β

Pure function over (weight, spec); no activations are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import InvalidSpecError
from lowbit.formats import primitives as P
from lowbit.formats.codecs import int_qparams
from lowbit.formats.spec import QuantSpec
from lowbit.tensor import QuantizedWeight, as_2d, check_finite

_CHUNK_ELEMENTS = 1 << 21  # weights per row chunk: bounds the solver's float32 temporaries to ~8 MiB each
_ZERO_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class HQQConfig:
    iters: int = 20          # half-quadratic iterations (zero-point updates); 0 = round-to-nearest
    lp_norm: float = 0.7     # p of the sparsity-promoting l_p error norm (p < 1)
    beta: float = 10.0       # initial penalty weight
    kappa: float = 1.01      # beta multiplier per iteration
    early_stop: bool = True  # a group stops updating once its mean |error| stops improving

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 0:
            raise InvalidSpecError(f"HQQConfig.iters must be a non-negative integer, got {self.iters!r}")
        if not 0 < self.lp_norm <= 1:
            raise InvalidSpecError(f"HQQConfig.lp_norm must be in (0, 1], got {self.lp_norm!r}")
        if not self.beta > 0 or not self.kappa > 0:
            raise InvalidSpecError(f"HQQConfig.beta and kappa must be positive, got beta={self.beta!r}, "
                                   f"kappa={self.kappa!r}")


def hqq_quantize(weight: torch.Tensor, spec: QuantSpec, config: HQQConfig = HQQConfig(),
                 name: str = "weight") -> QuantizedWeight:
    """HQQ-quantize ``weight`` [N, K] (any float dtype; solved in float32) to an asymmetric int ``spec``.

    ``spec`` must be ``format='int'``, asymmetric, per-channel or per-group. The scale stays the
    round-to-nearest one (as stored); only the zero-points are optimised. Each group keeps the best
    zero-point seen (by mean absolute reconstruction error, evaluated with the zero as it will be
    stored), so no group ends up worse than round-to-nearest in that measure, and ``iters=0``
    reproduces round-to-nearest exactly.

    HQQ's zero-points are real-valued: if ``spec.zero_dtype`` is ``'int'`` the result is stored with
    ``zero_dtype='float16'`` instead (returned ``QuantizedWeight.spec`` says so). That costs
    16 − b bits per group over b-bit integer zeros, e.g. +12/128 ≈ +0.09 bits/weight for int4-g128.

    Rows are processed in chunks (~2M weights each), all groups of a chunk at once.
    """
    if spec.format != "int" or spec.symmetric or spec.granularity == "tensor":
        raise InvalidSpecError(f"{name}: HQQ needs an asymmetric int format with per-channel or per-group scales, "
                               f"got {spec.describe()}")
    w = as_2d(weight, name)
    check_finite(w, name)  # before the solver, so NaN/Inf is reported against this layer
    out_spec = spec if spec.float_zero else spec.replace(zero_dtype="float16")
    zero_dtype = _ZERO_DTYPES[out_spec.zero_dtype]
    scale, zero = int_qparams(w, out_spec, name)  # [R, G] each; scale as stored
    x = P.grouped(w, out_spec, name)  # [R, G, g]
    rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1] * x.shape[2]))
    qmax = (1 << spec.bits) - 1
    zero = torch.cat([_solve(xc.float(), sc, zc, qmax, zero_dtype, config)
                      for xc, sc, zc in zip(x.split(rows), scale.split(rows), zero.split(rows))])
    return QuantizedWeight.from_qparams(w, out_spec, scale, zero, name)


def _solve(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, zero_dtype: torch.dtype,
           config: HQQConfig) -> torch.Tensor:
    """Half-quadratic zero-point solver for groups ``x`` [r, G, g] float32, scale/zero [r, G]. Returns best zero [r, G]."""
    s = scale.unsqueeze(-1)  # [r, G, 1]
    x_over_s = x / s  # the same float division quantize_affine does, so codes match the stored ones exactly
    best_zero = zero.clone()
    best_err = torch.full_like(zero, float("inf"))
    active = torch.ones_like(zero, dtype=torch.bool)
    beta = config.beta
    for step in range(config.iters + 1):
        z = zero.to(zero_dtype).float()  # evaluate the zero-point as it will be stored
        q = (x_over_s + z.unsqueeze(-1)).round_().clamp_(0, qmax)  # W_q
        err = x - (q - z.unsqueeze(-1)) * s  # W − W_r
        mean_abs = err.abs().mean(dim=-1)  # [r, G]
        improved = mean_abs < best_err
        best_zero = torch.where(improved, z, best_zero)
        best_err = torch.where(improved, mean_abs, best_err)
        if config.early_stop:
            active &= improved
        if step == config.iters or not active.any():
            break
        w_e = _shrink_lp(err, beta, config.lp_norm)
        # z = mean(W_q − (W − W_e)/s), with (W − W_e)/s = W/s − W_e/s
        zero = torch.where(active, (q - x_over_s).mean(dim=-1) + w_e.mean(dim=-1) / scale, zero)
        beta *= config.kappa
    return best_zero


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal step of the l_p norm: sign(x)·relu(|x| − |x|^(p−1)/β)."""
    magnitude = x.abs()
    threshold = (magnitude + 1e-8).pow_(p - 1).div_(beta)
    return magnitude.sub_(threshold).relu_().mul_(x.sign())
