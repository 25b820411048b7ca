"""AWQ (Lin et al. 2023): activation-aware weight quantization.

Per block: (1) for each group of linears reading the same norm output, search s = mean|x|^α over a
grid of α, scaling the weights' input columns by s (protecting salient channels) and folding 1/s
into the norm — the α minimising the quantized layers' output error on calibration inputs wins;
(2) per linear, search a clipping ratio of each group's weight range minimising output error;
(3) round-to-nearest quantization of the transformed weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.formats import primitives as P
from lowbit.formats.spec import QuantSpec
from lowbit.models.targets import float_weight


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20              # α values tried in [0, 1)
    clip: bool = True           # search per-group clipping of the weight range
    clip_grid: int = 20
    max_shrink: float = 0.5     # smallest clipping ratio tried is 1 - max_shrink
    max_rows: int = 2048        # calibration input rows kept per layer for the searches


class InputSampler:
    """Per-input-channel mean |x| over all rows, plus a uniform sample of at most ``max_rows`` rows."""

    def __init__(self, in_features: int, max_rows: int = 2048, seed: int = 0) -> None:
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.rows_seen = 0
        self.max_rows = max_rows
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("calibration activations contain NaN/Inf")
        self.abs_sum += x.abs().sum(0).double().cpu()
        self.rows_seen += x.shape[0]
        keep = min(x.shape[0], max(1, self.max_rows // 4))  # rows() later subsamples to max_rows
        idx = torch.randperm(x.shape[0], generator=self._gen)[:keep]
        self.samples.append(x[idx.to(x.device)].cpu())

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(1, self.rows_seen)).float()

    def rows(self) -> torch.Tensor:
        x = torch.cat(self.samples)
        if x.shape[0] > self.max_rows:
            x = x[torch.randperm(x.shape[0], generator=self._gen)[: self.max_rows]]
        return x


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of an int ``weight`` [N, K] (float32, for searches)."""
    x = P.grouped(weight, spec)
    scale, zero = P.choose_qparams(x, spec.bits, spec.symmetric)
    return P.dequantize_affine(P.quantize_affine(x, scale, zero, spec.bits, spec.symmetric), scale, zero).reshape(weight.shape)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Float32 weight [out, in] of an nn.Linear / Conv1D."""
    return float_weight(module).float()


@torch.no_grad()
def search_scale(x: torch.Tensor, x_abs_mean: torch.Tensor, weights: list[torch.Tensor], specs: list[QuantSpec],
                 config: AWQConfig) -> torch.Tensor:
    """Best per-input-channel scale s [K] for linears sharing input rows ``x`` [n, K]."""
    x = x.to(weights[0].device)
    refs = [x @ w.t() for w in weights]
    mean = x_abs_mean.to(x.device).clamp(min=1e-8)
    best_err, best_scale = float("inf"), torch.ones_like(mean)
    for i in range(config.grid):
        ratio = i / config.grid
        s = mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, spec, ref in zip(weights, specs, refs):
            q = fake_quantize(w * s, spec) / s
            err += (x @ q.t() - ref).pow(2).mean().item()
        if err < best_err:
            best_err, best_scale = err, s
    return best_scale


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, spec: QuantSpec, config: AWQConfig,
                row_chunk: int = 256) -> torch.Tensor:
    """``weight`` [N, K] with each group's range clipped to the ratio minimising its output error."""
    x = x.to(weight.device)
    n_rows = min(x.shape[0], 512)
    xg = P.grouped(x[:n_rows], spec if spec.granularity != "tensor" else spec.replace(granularity="channel"))
    out = weight.clone()
    steps = max(1, int(config.clip_grid * config.max_shrink))
    for r0 in range(0, weight.shape[0], row_chunk):
        w = weight[r0 : r0 + row_chunk]
        wg = P.grouped(w, spec)  # [N', G, g]
        org_max = wg.abs().amax(-1, keepdim=True)
        ref = torch.einsum("ngk,ogk->nog", xg, wg)  # [n, N', G]
        best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
        best_max = org_max.clone()
        for i in range(steps):
            max_val = org_max * (1 - i / config.clip_grid)
            clipped = torch.clamp(wg, -max_val, max_val).reshape(w.shape)
            q = P.grouped(fake_quantize(clipped, spec), spec)
            err = (torch.einsum("ngk,ogk->nog", xg, q) - ref).pow(2).mean(0)  # [N', G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
        out[r0 : r0 + row_chunk] = torch.clamp(wg, -best_max, best_max).reshape(w.shape)
    return out
