"""Weighting: how much *model* error one unit of a layer's relative output error costs.

The planner minimises Σ_l c_l · E_l(format_l), where E_l is the layer's relative output error
(:mod:`lowbit.plan.measure`) and c_l its sensitivity. Why this form:

* **Linear in E within a layer.** To second order the model's loss change from a small output
  perturbation e_l is a quadratic form in e_l, so for quantization noise of a given shape it scales
  with ‖e_l‖² ∝ E_l. On the built-in LM, KL(float ‖ model with only layer l quantized) / E_l stays
  within ±10 % across int2 … int5 and nf4 for every layer — while it spans 300× *between* layers
  (layer 0's q_proj ≈ 0.003 nats per unit of relative error, its down_proj ≈ 1.0). Unweighted
  relative errors (or output energies) would therefore rank layers badly; one calibration point per
  layer pins c_l.
* **Additive across layers.** Cross terms between independent layers' rounding noise vanish in
  expectation, so per-layer KLs add up to the model's KL. Checked twice: at measurement time, every
  layer at its reference at once gives 1.05× the sum of the per-layer KLs on the built-in LM
  (:func:`joint_kl`, saved as ``additivity``); and ``lowbit plan --verify`` reports the planned
  model's measured KL on held-out text beside the prediction (RTN plans: 1.1–1.2× the prediction,
  GPTQ plans: ~1.35×, since GPTQ then runs on already-quantized inputs rather than the float ones
  it was measured on). A common factor does not change which plan is best at a given size.

``kl`` weighting (the default) measures c_l end to end: quantize layer l alone to a *reference*
candidate (the one whose relative error is nearest :data:`REFERENCE_ERROR` — inside the
quadratic regime, well above float noise), run the model on ``kl_samples`` calibration windows,
c_l = KL / E_l(reference). One forward pass per layer; predicted errors are then in nats/token of
KL, so a ``--max-kl`` bound means what it says. ``relative`` weighting (c_l = 1, no model runs) is the
fallback when a full forward pass per layer is too expensive; it is a much poorer predictor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.plan.measure import LayerMeasurement
from lowbit.tensor import QuantizedWeight

WEIGHTINGS = ("kl", "relative")
REFERENCE_ERROR = 0.02  # relative output error of the reference quantization (≈ int3 with groups of 64)
_ROWS = 256             # positions per float64 log-softmax chunk


def choose_reference(rel_errors: list[float | None]) -> int | None:
    """Index of the candidate whose relative error is nearest REFERENCE_ERROR on a log scale (first on ties)."""
    best, best_gap = None, math.inf
    for k, e in enumerate(rel_errors):
        if e is None or e <= 0:
            continue
        gap = abs(math.log(e / REFERENCE_ERROR))
        if gap < best_gap:
            best, best_gap = k, gap
    return best


@torch.no_grad()
def log_probs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per batch: float32 log-probabilities [B, L, V] of ``input_ids`` [S, L]."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, input_ids.shape[0], batch_size):
        logits = model(input_ids=input_ids[i : i + batch_size].to(device)).logits.float()
        out.append(torch.log_softmax(logits.double(), dim=-1).float().cpu())
    return out


@torch.no_grad()
def mean_kl(model: nn.Module, input_ids: torch.Tensor, reference: list[torch.Tensor], batch_size: int = 8) -> float:
    """Mean per-token KL(P_reference ‖ P_model) in nats over every position of ``input_ids`` [S, L].

    Computed in float64: the per-layer checks measure KLs down to ~1e-6 nats, where float32
    log-softmax round-off (~1e-7 per term, summed over the vocabulary) would be visible.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b, i in enumerate(range(0, input_ids.shape[0], batch_size)):
        logits = model(input_ids=input_ids[i : i + batch_size].to(device)).logits.float().cpu()
        ref = reference[b]
        flat, ref_flat = logits.reshape(-1, logits.shape[-1]), ref.reshape(-1, ref.shape[-1])
        for r in range(0, flat.shape[0], _ROWS):
            logq = torch.log_softmax(flat[r : r + _ROWS].double(), dim=-1)
            logp = ref_flat[r : r + _ROWS].double()
            total += float((logp.exp() * (logp - logq)).sum())
        count += flat.shape[0]
    return total / max(count, 1)


def kl_sensitivities(model: nn.Module, layers: dict[str, LayerMeasurement], references: dict[str, QuantizedWeight],
                     input_ids: torch.Tensor, *, batch_size: int = 8, show_progress: bool = False) -> dict[str, float]:
    """Fill ``sensitivity``, ``reference`` and ``reference_kl`` of every layer from end-to-end KL checks.

    ``references[name]`` is the layer's reference QuantizedWeight (kept by the measurement). Each
    layer in turn gets its dequantized reference weight, the model runs on ``input_ids`` [S, L], the
    KL against the float model's output is recorded, and the float weight is put back. Returns
    :func:`joint_kl`'s additivity check.
    """
    from lowbit.models.targets import is_conv1d
    from lowbit.progress import progress

    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{type(model).__name__}: KL weighting needs a language-model head; "
                                    "use --weighting relative")
    reference_logp = log_probs(model, input_ids, batch_size)
    for name in progress(list(layers), desc="sensitivity", enabled=show_progress, unit="layer"):
        layer = layers[name]
        qw = references.get(name)
        if qw is None:  # no candidate has a positive error (an all-zero weight): it costs nothing anywhere
            layer.sensitivity, layer.reference, layer.reference_kl = 0.0, None, 0.0
            continue
        k = choose_reference(layer.rel_error)
        module = model.get_submodule(name)
        original = module.weight.data
        approx = qw.dequantize(torch.float32).to(original.device, original.dtype)
        module.weight.data = approx.t().contiguous() if is_conv1d(module) else approx
        try:
            kl = mean_kl(model, input_ids, reference_logp, batch_size)
        finally:
            module.weight.data = original
        error = layer.rel_error[k] if k is not None else None
        layer.reference, layer.reference_kl = k, max(kl, 0.0)
        layer.sensitivity = max(kl, 0.0) / error if error else 0.0
    return joint_kl(model, layers, references, input_ids, reference_logp, batch_size)


def joint_kl(model: nn.Module, layers: dict[str, LayerMeasurement], references: dict[str, QuantizedWeight],
             input_ids: torch.Tensor, reference_logp: list[torch.Tensor], batch_size: int = 8) -> dict[str, float]:
    """One more end-to-end check with *every* layer at its reference at once: how far the per-layer KLs add up.

    Returns {"joint_kl": measured, "sum_kl": Σ per-layer KLs, "interaction": their ratio}. The ratio is
    reported, not applied: scaling every weight by it would not change which plan is best at a size,
    and it holds at the reference error level only (int3-like everywhere), not at a plan's mix.
    """
    from lowbit.models.targets import is_conv1d

    originals = {}
    try:
        for name, qw in references.items():
            module = model.get_submodule(name)
            originals[name] = module.weight.data
            approx = qw.dequantize(torch.float32).to(module.weight.device, module.weight.dtype)
            module.weight.data = approx.t().contiguous() if is_conv1d(module) else approx
        kl = mean_kl(model, input_ids, reference_logp, batch_size)
    finally:
        for name, weight in originals.items():
            model.get_submodule(name).weight.data = weight
    total = sum(layer.reference_kl or 0.0 for layer in layers.values())
    return {"joint_kl": kl, "sum_kl": total, "interaction": kl / total if total > 0 else None}


def relative_sensitivities(layers: dict[str, LayerMeasurement]) -> None:
    """``relative`` weighting: every layer's relative output error counts once (c_l = 1)."""
    for layer in layers.values():
        layer.sensitivity, layer.reference, layer.reference_kl = 1.0, None, None


def describe_weighting(weighting: str) -> dict[str, Any]:
    return {"weighting": weighting,
            "predicted_error_unit": "KL nats/token (calibration data)" if weighting == "kl"
            else "sum of relative layer output errors"}
