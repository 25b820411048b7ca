"""Unstructured and N:M pruning of a model's linear layers: magnitude, Wanda, SparseGPT.

* **magnitude**: zero the weights of least |W| in each layer (no data).
* **Wanda** (Sun et al. 2023): score |W_ij| · ‖X_j‖₂ with X_j the j-th input feature over the calibration
  tokens; the lowest scores of each output row are zeroed (N:M: the n lowest of every m consecutive inputs
  of a row). No weight update.
* **SparseGPT** (Frantar & Alistarh 2023): the optimal-brain-surgeon update GPTQ uses, with pruning as the
  "rounding": columns are processed left to right; in each block of columns the weights with least
  w² / [H⁻¹]_jj² are masked (per block of 128 columns, or n of every m inputs), and the error of each
  zeroed weight is spread over the not yet processed columns through the Cholesky factor of H⁻¹ — the
  same inverse-Hessian code as GPTQ (:func:`lowbit.algorithms.gptq._inverse_hessian_cholesky`).

Wanda and SparseGPT run on the shared calibration runner (:func:`lowbit.algorithms.calibrate.run_layer_by_layer`):
each block's statistics are collected on the outputs of the already pruned earlier blocks; SparseGPT
prunes a block's layers stage by stage (q/k/v, o, gate/up, down), as true-sequential GPTQ does.
The result is the same float model with zeros — what research on sparsity and joint sparse + quantized
accuracy needs; it saves, loads and quantizes like any float model (the speed story is structured pruning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, ShapeError
from lowbit.formats import primitives as P
from lowbit.formats.spec import QuantSpec
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import QuantizedWeight

METHODS = ("magnitude", "wanda", "sparsegpt", "nm")
DEFAULT_BLOCK = 128  # SparseGPT: columns per block (mask selection and lazy update)


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``nm=(n, m)``: zero n of every m consecutive inputs of each row (2:4 → (2, 4));
    then ``sparsity`` is n/m. ``method="nm"`` is Wanda's score with an N:M pattern (default 2:4)."""

    method: str = "wanda"
    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    damp: float = 0.01           # SparseGPT: fraction of mean(diag(H)) added to the diagonal
    block_size: int = DEFAULT_BLOCK
    quant: QuantSpec | None = None  # SparseGPT only: quantize the kept weights in the same pass (joint)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidSpecError(f"prune method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method == "nm" and self.nm is None:
            object.__setattr__(self, "nm", (2, 4))
        if self.nm is not None:
            n, m = self.nm
            if not (0 < n < m):
                raise InvalidSpecError(f"N:M pattern {n}:{m}: need 0 < N < M (e.g. 2:4)")
            object.__setattr__(self, "sparsity", n / m)
        if not 0.0 < self.sparsity < 1.0:
            raise InvalidSpecError(f"sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if self.quant is not None and (self.method != "sparsegpt" or self.quant.format != "int"
                                       or self.quant.granularity == "tensor" or self.quant.float_zero):
            raise InvalidSpecError("joint pruning + quantization is SparseGPT's (--method sparsegpt) onto an int "
                                   "format with per-channel or per-group scales and integer zero-points, not "
                                   f"{self.method} / {self.quant.describe()}")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` → (2, 4)."""
    n, sep, m = text.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise InvalidSpecError(f"--nm {text!r}: expected N:M, e.g. 2:4")
    return int(n), int(m)


# ---- masks and updates on one weight [N, K] ---------------------------------------------------------
def _check_nm(weight: torch.Tensor, nm: tuple[int, int] | None, name: str) -> None:
    if nm is not None and weight.shape[1] % nm[1]:
        raise ShapeError(f"{name}: {nm[0]}:{nm[1]} needs the input dimension ({weight.shape[1]}) to be a multiple "
                         f"of {nm[1]}")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: the n lowest scores of every m consecutive columns of each row of ``score`` [N, K]."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(rows, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where pruned: the ``round(sparsity·K)`` lowest scores of each row of ``score`` [N, K]."""
    k = int(round(sparsity * score.shape[1]))
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    lowest = torch.topk(score, k, dim=1, largest=False).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, lowest, True)


def magnitude_prune(weight: torch.Tensor, config: PruneConfig, name: str = "weight") -> torch.Tensor:
    """Zero the ``sparsity`` fraction of least |w| over the whole layer (N:M: per group of m inputs)."""
    w = weight.detach().float()
    _check_nm(w, config.nm, name)
    if config.nm is not None:
        return w.masked_fill(nm_mask(w.abs(), *config.nm), 0.0)
    k = int(round(config.sparsity * w.numel()))
    if k == 0:
        return w.clone()
    flat = w.abs().flatten()
    lowest = torch.topk(flat, k, largest=False).indices
    return w.flatten().index_fill(0, lowest, 0.0).reshape(w.shape)


def wanda_prune(weight: torch.Tensor, input_sq: torch.Tensor, config: PruneConfig, name: str = "weight") -> torch.Tensor:
    """Wanda: score |W_ij|·‖X_j‖₂ (``input_sq`` [K] = Σ_t x_tj², any positive scale); zero each row's lowest."""
    w = weight.detach().float()
    _check_nm(w, config.nm, name)
    score = w.abs() * input_sq.float().clamp(min=0).sqrt().unsqueeze(0)
    mask = nm_mask(score, *config.nm) if config.nm is not None else row_mask(score, config.sparsity)
    return w.masked_fill(mask, 0.0)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, config: PruneConfig,
                    name: str = "weight") -> torch.Tensor | QuantizedWeight:
    """SparseGPT: prune ``weight`` [N, K] given its input Hessian [K, K]; returns the pruned, updated weight.

    With ``config.quant`` the kept weights are also rounded onto that integer grid column by column, each
    column's pruning *and* rounding error compensated on the columns not yet processed (the SparseGPT paper's
    joint sparsification + quantization); the scales and zero-points are GPTQ's static groups (min/max range
    shrunk for least error, from the weight before pruning). Returns the QuantizedWeight then: pruned weights
    are code z, i.e. exactly 0.
    """
    from lowbit.algorithms.gptq import GPTQConfig, _group_qparams, _inverse_hessian_cholesky

    w = weight.detach().float().clone()
    _check_nm(w, config.nm, name)
    rows, k = w.shape
    h = hessian.to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    spec = config.quant
    if spec is not None:
        scale, zero = _group_qparams(w, spec, GPTQConfig(), name)  # [N, G]
        g = spec.group_size if spec.granularity == "group" else k
        qmin, qmax = P.int_range(spec.bits, spec.symmetric)
    hinv = _inverse_hessian_cholesky(h, GPTQConfig(damp=config.damp), name)
    del h
    for i1 in range(0, k, config.block_size):
        i2 = min(i1 + config.block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if config.nm is None:  # this block's mask: the least w²/d² over the block, sparsity of its weights
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
            score = w1.pow(2) / d.pow(2).unsqueeze(0)
            count = int(round(config.sparsity * score.numel()))
            if count:
                mask1.view(-1)[torch.topk(score.flatten(), count, largest=False).indices] = True
        else:
            n_prune, m = config.nm
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if config.nm is not None and i % config.nm[1] == 0:  # choose the group's mask on updated weights
                m = config.nm[1]
                score = w1[:, i:i + m].pow(2) / d[i:i + m].pow(2).unsqueeze(0)
                lowest = torch.topk(score, config.nm[0], dim=1, largest=False).indices
                mask1[:, i:i + m].scatter_(1, lowest, True)
            col = w1[:, i]
            q = col
            if spec is not None:
                s, z = scale[:, (i1 + i) // g], zero[:, (i1 + i) // g]
                q = (torch.clamp(torch.round(col / s + z), qmin, qmax) - z) * s
            q = q.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if spec is not None:
        return QuantizedWeight.from_qparams(w, spec, scale, zero, name)
    return w


# ---- whole models -------------------------------------------------------------------------------------
class InputSquares:
    """Σ_t x_tj² per input feature over the calibration tokens (Wanda's ‖X_j‖₂²)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sq.device, torch.float32)
        if not torch.isfinite(x).all():
            raise FloatingPointError("calibration activations contain NaN/Inf")
        self.sq += x.pow(2).sum(0, dtype=torch.float64)


@dataclass
class PruneResult:
    method: str
    nm: str | None
    target_sparsity: float
    layers: dict[str, float] = field(default_factory=dict)  # layer → fraction of zero weights
    zeros: int = 0
    params: int = 0
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "nm": self.nm, "target_sparsity": self.target_sparsity,
                "sparsity": round(self.sparsity, 6), "zeros": self.zeros, "pruned_params": self.params,
                "layers_pruned": len(self.layers), "seconds": round(self.seconds, 3),
                "per_layer": {k: round(v, 6) for k, v in self.layers.items()}}


def prune_targets(model: nn.Module) -> list[str]:
    """The layers pruning covers: those ``lowbit quantize`` would quantize by default (every linear layer but
    the output head)."""
    from lowbit.models.targets import select_targets
    from lowbit.recipe import QuantRecipe

    return list(select_targets(model, QuantRecipe(QuantSpec(), "rtn")))


def prune_model(model: nn.Module, config: PruneConfig, *, tokenizer: Any = None, calib: Any = None,
                device: str | torch.device = "cpu", batch_size: int = 8, show_progress: bool = False) -> PruneResult:
    """Prune ``model``'s linear layers in place (float weights with zeros); returns the per-layer sparsity."""
    from lowbit.models.targets import float_weight, is_conv1d, linear_dims

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise InvalidSpecError("prune the float model, then quantize (this one is already quantized)")
    start = time.perf_counter()
    targets = prune_targets(model)
    if not targets:
        raise InvalidSpecError("the model has no linear layer to prune")
    result = PruneResult(config.method, None if config.nm is None else f"{config.nm[0]}:{config.nm[1]}",
                         config.sparsity)

    def store(name: str, module: nn.Module, pruned: torch.Tensor | QuantizedWeight) -> nn.Module:
        if isinstance(pruned, QuantizedWeight):  # joint SparseGPT + quantization: the packed layer takes its place
            new = QuantLinear.from_weight(pruned, getattr(module, "bias", None))
            zeros = int((pruned.dequantize() == 0).sum())
            result.layers[name] = zeros / pruned.numel
            result.zeros += zeros
            result.params += pruned.numel
            return new
        param = module.weight
        with torch.no_grad():
            param.data = (pruned.t().contiguous() if is_conv1d(module) else pruned).to(param.dtype).to(param.device)
        zeros = int((pruned == 0).sum())
        result.layers[name] = zeros / pruned.numel()
        result.zeros += zeros
        result.params += pruned.numel()
        return module

    for name in targets:  # shapes first: fail before any work
        _check_nm(float_weight(model.get_submodule(name)), config.nm, name)
    if not config.needs_data:
        from lowbit.progress import progress

        for name in progress(targets, desc="prune", enabled=show_progress, unit="layer"):
            module = model.get_submodule(name)
            store(name, module, magnitude_prune(float_weight(module), config, name))
        result.seconds = time.perf_counter() - start
        return result

    from lowbit.algorithms.calib_data import CalibConfig, calibration_batches
    from lowbit.algorithms.calibrate import LayerJob, run_layer_by_layer
    from lowbit.algorithms.gptq import HessianAccumulator

    ids = calibration_batches(tokenizer, calib or CalibConfig())
    batches = [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size])}
               for i in range(0, ids.shape[0], batch_size)]
    sparsegpt = config.method == "sparsegpt"

    def make_stats(name: str, module: nn.Module) -> Any:
        k = linear_dims(module)[0]
        return HessianAccumulator(k, device=device) if sparsegpt else InputSquares(k, device=device)

    def replace(job: LayerJob) -> nn.Module:
        w = float_weight(job.module)
        if sparsegpt:
            pruned = sparsegpt_prune(w, job.stats.hessian, config, job.name)
        else:  # wanda / nm
            pruned = wanda_prune(w, job.stats.sq, config, job.name)
        return store(job.name, job.module, pruned)

    run_layer_by_layer(model, batches, targets={n: None for n in targets}, make_stats=make_stats, replace=replace,
                       device=device, sequential=sparsegpt, share_stats=True, show_progress=show_progress)
    for name in targets:  # outside the blocks (no captured inputs): magnitude
        if name not in result.layers:
            module = model.get_submodule(name)
            store(name, module, magnitude_prune(float_weight(module), config, name))
    result.layers = {n: result.layers[n] for n in targets}
    result.seconds = time.perf_counter() - start
    return result
