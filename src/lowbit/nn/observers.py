"""Observers: watch a layer's input activations during calibration and choose a static scale/zero.

Every observer has ``observe(x)`` (any shape, floating point; called once per calibration batch)
and ``qparams(bits, symmetric) -> (scale, zero)``, both float32 [1] — one per-tensor pair, the
layout of :class:`~lowbit.nn.QuantLinear`'s ``input_scale``/``input_zero`` buffers. The scale and
zero-point math is :func:`lowbit.formats.primitives.choose_qparams` applied to the chosen range.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lowbit.errors import InvalidWeightError, LowbitError
from lowbit.formats import primitives as P
from lowbit.formats.act import ActSpec

DEFAULT_MAX_SAMPLES = 1 << 17  # values kept for percentile / MSE (bounded memory whatever the calibration size)
MSE_GRID = 100  # clipping ratios tried by the MSE observer


def check_activations_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`InvalidWeightError` naming layer ``name`` if ``x`` holds NaN or Inf."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InvalidWeightError(f"{name}: activations contain NaN/Inf ({bad} of {x.numel()} values); "
                                 "cannot calibrate activation scales on them")


def qparams_from_range(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int,
                       symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (scale, zero), float32 [1], covering [lo, hi] (0 is always representable)."""
    bounds = torch.tensor([float(lo), float(hi)], dtype=torch.float32).reshape(1, 1, 2)
    scale, zero = P.choose_qparams(bounds, bits, symmetric)
    return scale.reshape(1), zero.reshape(1)


class Observer(ABC):
    """Base class: NaN/Inf checks and bookkeeping; subclasses keep statistics in ``_update``."""

    def __init__(self, name: str = "activation") -> None:
        self.name = name
        self.batches = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record one batch of activations ``x`` (any shape)."""
        x = x.detach()
        check_activations_finite(x, self.name)
        if x.numel():
            self._update(x.float().reshape(-1))
            self.batches += 1

    def qparams(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) float32 [1] for ``bits``-bit codes (zero is 0 when ``symmetric``)."""
        if not self.batches:
            raise LowbitError(f"{self.name}: no activations observed; run calibration batches through the model "
                              "between prepare() and convert()")
        lo, hi = self._range(bits, symmetric)
        return qparams_from_range(lo, hi, bits, symmetric)

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None:
        """Fold one batch ``x`` (flat float32 [n], finite, non-empty) into the statistics."""

    @abstractmethod
    def _range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        """The (lo, hi) range the codes should cover."""


class MinMaxObserver(Observer):
    """Running min and max over everything observed."""

    def __init__(self, name: str = "activation") -> None:
        super().__init__(name)
        self.min = float("inf")
        self.max = float("-inf")

    def _update(self, x: torch.Tensor) -> None:
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())

    def _range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        return self.min, self.max


class EMAObserver(Observer):
    """Moving-average min/max: ``m ← m + momentum·(batch_m − m)`` (the first batch sets it)."""

    def __init__(self, name: str = "activation", momentum: float = 0.1) -> None:
        super().__init__(name)
        self.momentum = momentum
        self.min = 0.0
        self.max = 0.0

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.min().item(), x.max().item()
        if self.batches == 0:
            self.min, self.max = lo, hi
        else:
            self.min += self.momentum * (lo - self.min)
            self.max += self.momentum * (hi - self.max)

    def _range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        return self.min, self.max


class _SampledObserver(Observer):
    """Keeps a bounded, uniformly weighted random subsample of the observed values (on the CPU)."""

    def __init__(self, name: str = "activation", max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0) -> None:
        super().__init__(name)
        self.max_samples = max_samples
        self.sample = torch.empty(0)
        self.seen = 0
        self.min = float("inf")
        self.max = float("-inf")
        self._generator = torch.Generator().manual_seed(seed)

    def _update(self, x: torch.Tensor) -> None:
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())
        n = x.numel()
        if n > self.max_samples:
            idx = torch.randperm(n, generator=self._generator)[: self.max_samples]
            x = x[idx.to(x.device)]
        x = x.cpu()
        if self.sample.numel() + x.numel() <= self.max_samples:
            self.sample = torch.cat([self.sample, x])
        else:  # keep max_samples values, each drawn with the share of the data it stands for
            weights = torch.cat([torch.full((self.sample.numel(),), self.seen / max(self.sample.numel(), 1)),
                                 torch.full((x.numel(),), n / x.numel())])
            idx = torch.multinomial(weights, self.max_samples, replacement=False, generator=self._generator)
            self.sample = torch.cat([self.sample, x])[idx]
        self.seen += n


class PercentileObserver(_SampledObserver):
    """Clips at the ``percentile`` of |x| (symmetric) or at the (100−p, p) percentiles of x (asymmetric)."""

    def __init__(self, name: str = "activation", percentile: float = 99.99,
                 max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        super().__init__(name, max_samples)
        self.percentile = percentile

    def _range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        q = self.percentile / 100
        if symmetric:
            amax = torch.quantile(self.sample.abs(), q).item()
            return -amax, amax
        lo_hi = torch.quantile(self.sample, torch.tensor([1 - q, q]))
        return lo_hi[0].item(), lo_hi[1].item()


class MSEObserver(_SampledObserver):
    """Grid search over clipping ranges ``α·[min, max]`` (α ∈ (0, 1]) minimising the quantization MSE."""

    def _range(self, bits: int, symmetric: bool) -> tuple[float, float]:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if symmetric:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        x = self.sample.reshape(1, 1, -1)
        best, best_err = (lo, hi), float("inf")
        for alpha in torch.linspace(1.0, 1.0 / MSE_GRID, MSE_GRID).tolist():
            scale, zero = qparams_from_range(alpha * lo, alpha * hi, bits, symmetric)
            scale, zero = scale.reshape(1, 1), zero.reshape(1, 1)
            q = P.quantize_affine(x, scale, zero, bits, symmetric)
            err = (P.dequantize_affine(q, scale, zero) - x).pow(2).mean().item()
            if err < best_err:
                best, best_err = (alpha * lo, alpha * hi), err
        return best


def make_observer(spec: ActSpec, name: str = "activation") -> Observer:
    """The observer ``spec.observer`` names, configured from ``spec``."""
    if spec.observer == "minmax":
        return MinMaxObserver(name)
    if spec.observer == "ema":
        return EMAObserver(name, spec.ema_momentum)
    if spec.observer == "percentile":
        return PercentileObserver(name, spec.percentile)
    return MSEObserver(name)
