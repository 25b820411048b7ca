"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8.

For each norm → linears group, s_j = max|X_j|^α / max|W_:,j|^(1−α); the linears' input columns are
multiplied by s and the norm's output divided by it (an exact transformation, verified per block),
which flattens the activation channels that make per-tensor int8 activations fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.awq import linear_weight
from lowbit.algorithms.calib_data import CalibConfig, calibration_batches
from lowbit.algorithms.calibrate import LayerJob, run_layer_by_layer
from lowbit.algorithms.smoothing import fold_into_norm, foldable_pairs
from lowbit.errors import InvalidSpecError
from lowbit.models.targets import linear_dims


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 = leave activations alone, 1 = move everything to weights

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidSpecError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")


class AbsMaxTracker:
    """Per-input-channel max |x| over all calibration rows."""

    def __init__(self, in_features: int) -> None:
        self.amax = torch.zeros(in_features)

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError("calibration activations contain NaN/Inf")
        self.amax = torch.maximum(self.amax, x.abs().amax(0).cpu())


def smoothing_scale(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] = max|X_j|^α / max_over_linears|W_:,j|^(1−α) (weights [N, K] each)."""
    w_amax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).cpu().clamp(min=1e-5)
    scale = act_amax.clamp(min=1e-5).pow(alpha) / w_amax.pow(1 - alpha)
    return scale.clamp(min=1e-5)


def smooth_model(model: nn.Module, tokenizer: Any, calib: CalibConfig, targets: dict[str, Any],
                 config: SmoothQuantConfig = SmoothQuantConfig(), *, device: str | torch.device = "cpu",
                 batch_size: int = 8, show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Smooth ``model`` in place (still float, same function). Returns {norm name: s} of the folds made."""
    ids = calibration_batches(tokenizer, calib)
    batches = [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
               for i in range(0, ids.shape[0], batch_size)]
    folds: dict[str, torch.Tensor] = {}

    def prepare_block(block: nn.Module, prefix: str, jobs: dict[str, LayerJob], run: Any) -> None:
        for norm_name, consumers in foldable_pairs(block, run).items():
            if not any(n in jobs for n in consumers):
                continue
            act_amax = jobs[next(n for n in consumers if n in jobs)].stats.amax
            linears = [block.get_submodule(n) for n in consumers]
            scale = smoothing_scale(act_amax, [linear_weight(m) for m in linears], config.alpha)
            fold_into_norm(block.get_submodule(norm_name), linears, scale.to(linears[0].weight.device))
            folds[prefix + norm_name] = scale

    run_layer_by_layer(model, batches, targets=targets, make_stats=lambda n, m: AbsMaxTracker(linear_dims(m)[0]),
                       replace=lambda job: job.module, device=device, prepare_block=prepare_block,
                       show_progress=show_progress)
    return folds
