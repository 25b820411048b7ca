"""``lowbit plan`` as functions: measure (or reuse the cached measurement) → solve → recipe + front → verify.

    measurement = measure_model(model, tokenizer, "builtin:tiny-lm", method="gptq")
    plan = make_plan(measurement, target_bpw=3.5)
    write_recipe(plan.recipe, "plan.yaml"); plan.pareto_json()
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.calib_data import CalibConfig
from lowbit.errors import CorruptFileError, InvalidSpecError
from lowbit.formats.spec import QuantSpec
from lowbit.plan import sensitivity as sens
from lowbit.plan.measure import (GGUFWeight, Measurement, is_gguf, measure_layers, model_fingerprint, parse_candidates,
                                 tensor_hash)
from lowbit.plan.recipe_out import plan_recipe
from lowbit.plan.solve import Solution, pareto_hull, solve_budget, solve_error_bound, thin
from lowbit.recipe import DEFAULT_SKIP, QuantRecipe

PARETO_FORMAT = "lowbit-plan-pareto"
MAX_FRONT_POINTS = 256


def plan_targets(model: nn.Module, method: str, skip: tuple[str, ...] = DEFAULT_SKIP, head: bool = True) -> list[str]:
    """The layers a plan covers: those ``lowbit quantize`` would quantize with this skip list, in model order,
    then (``head``) an output head tied to the input embedding, which the plan's recipe quantizes once and
    shares with the embedding (``tied_head: share``) — the matrix llama.cpp also quantizes (its token_embd)."""
    from lowbit.models.targets import select_targets

    targets = list(select_targets(model, QuantRecipe(QuantSpec(), method, skip=skip)))
    name = tied_head_name(model)
    if head and name is not None and name not in targets:
        targets.append(name)
    return targets


def tied_head_name(model: nn.Module) -> str | None:
    """The output head's module name when its weight is tied to the input embedding, else None."""
    from lowbit.models.build import output_head_name, tied_parameter_names

    name = output_head_name(model)
    tied = {t.rsplit(".", 1)[0] for t in tied_parameter_names(model)}
    return name if name is not None and name in tied else None


def float_part_bytes(model: nn.Module, targets: list[str]) -> int:
    """Stored bytes of everything but the target layers' weights (embeddings, norms, skipped layers, biases),
    as lowbit saves them from this (loaded) model."""
    from lowbit.eval.size import model_size
    from lowbit.models.targets import float_weight

    weights = [float_weight(model.get_submodule(n)) for n in targets]
    return model_size(model).size_bytes - sum(w.numel() * w.element_size() for w in weights)


def measurement_provenance(model_ref: str, model: nn.Module, calib_ids: torch.Tensor, calib: CalibConfig,
                           method: str, options: dict[str, Any], candidates: list[QuantSpec], weighting: str,
                           kl_samples: int, targets: list[str]) -> dict[str, Any]:
    """What a cached measurement must match to be reused."""
    from lowbit import __version__

    source = getattr(model, "lowbit_source", None)
    return {
        "model": str(Path(source).resolve()) if source is not None else str(model_ref),
        "model_fingerprint": model_fingerprint(Path(source)) if source is not None else None,
        "calib": {"source": calib.source, "samples": calib.samples, "seq_len": calib.seq_len, "seed": calib.seed,
                  "field": calib.field},
        "calib_hash": tensor_hash(calib_ids),
        "method": method, "options": dict(sorted(options.items())),
        "candidates": [s.describe() for s in candidates], "weighting": weighting,
        "kl_samples": kl_samples if weighting == "kl" else None,
        "targets": targets, "tied_head": tied_head_name(model) if tied_head_name(model) in targets else None,
        "lowbit_version": __version__,
    }


def measure_model(model: nn.Module, tokenizer: Any, model_ref: str, *, candidates: list[QuantSpec] | None = None,
                  method: str = "rtn", options: dict[str, Any] | None = None, calib: CalibConfig = CalibConfig(),
                  weighting: str = "kl", kl_samples: int = 8, batch_size: int = 8, device: str = "cpu",
                  cache: str | Path | None = None, reuse: bool = True, head: bool = True, inputs: str = "float",
                  show_progress: bool = False) -> tuple[Measurement, bool]:
    """Measure every target layer of the float ``model`` at every candidate (or reuse ``cache``).

    ``head``: also plan an output head tied to the input embedding (shared by both once quantized;
    measured in weight space, its KL sensitivity with the embedding quantized too).

    Returns (measurement, whether the cache was reused). ``cache`` is written after measuring.
    """
    from lowbit.algorithms.calib_data import calibration_batches

    if weighting not in sens.WEIGHTINGS:
        raise InvalidSpecError(f"unknown weighting {weighting!r}; choose one of {', '.join(sens.WEIGHTINGS)}")
    if kl_samples < 1:
        raise InvalidSpecError(f"kl_samples must be ≥ 1, got {kl_samples}")
    options = dict(options or {})
    candidates = candidates or parse_candidates(None, method)
    targets = plan_targets(model, method, head=head)
    if not targets:
        raise InvalidSpecError(f"{model_ref}: no linear layer to plan (all skipped)")
    ids = calibration_batches(tokenizer, calib)  # [samples, seq_len]
    provenance = measurement_provenance(model_ref, model, ids, calib, method, options, candidates, weighting,
                                        kl_samples, targets)
    if inputs != "float":
        provenance["inputs"] = inputs
    if cache is not None and reuse and Path(cache).is_file():
        try:
            cached = Measurement.load(cache)
        except CorruptFileError:  # an unreadable cache is measured again (and overwritten), not fatal
            cached = None
        if cached is not None and cached.provenance == provenance:
            return cached, True
    start = time.perf_counter()
    batches = [{"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
               for i in range(0, ids.shape[0], batch_size)]
    keep = sens.choose_reference if weighting == "kl" else None
    layers, references = measure_layers(model, batches, targets, candidates, method, options, device=device,
                                        keep=keep, inputs=inputs, show_progress=show_progress)
    model.to(device)  # the runner leaves the blocks where they were and the rest on the device; the checks run it whole
    extra: dict[str, Any] = {}
    if weighting == "kl":
        extra["additivity"] = sens.kl_sensitivities(model, layers, references, ids[:kl_samples],
                                                    batch_size=batch_size, show_progress=show_progress)
    else:
        sens.relative_sensitivities(layers)
    measurement = Measurement(provenance, list(candidates), [layers[n] for n in targets],
                              float_part_bytes(model, targets), weighting, time.perf_counter() - start, extra)
    if cache is not None:
        measurement.save(cache)
    return measurement, False


@dataclass
class Plan:
    """A solved plan: the chosen candidate per layer, its recipe, and the Pareto front it sits on."""

    measurement: Measurement
    solution: Solution
    front: list[Solution]
    target: dict[str, Any]
    recipe: QuantRecipe | None             # None for GGUF candidates: see gguf_types
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gguf_types(self) -> dict[str, str] | None:
        """GGUF candidates: {module name: block type} for ``lowbit export --plan`` (None for lowbit formats)."""
        if not is_gguf(self.measurement.candidates):
            return None
        return {name: spec.describe() for name, spec in self.layer_specs.items()}

    @property
    def layer_specs(self) -> dict[str, Any]:
        m = self.measurement
        return {layer.name: m.candidates[k] for layer, k in zip(m.layers, self.solution.choices)}

    def point(self, s: Solution, with_choices: bool = True) -> dict[str, Any]:
        """One allocation as JSON: bits/weight over the planned layers, whole-model bytes, predicted error."""
        m = self.measurement
        out: dict[str, Any] = {"bits_per_weight": round(8 * s.cost / m.numel, 6), "size_bytes": m.float_bytes + s.cost,
                               "quantized_bytes": s.cost, "predicted_error": s.error}
        if with_choices:
            out["choices"] = [m.candidates[k].describe() for k in s.choices]
        return out

    def uniform(self) -> list[dict[str, Any]]:
        """Every candidate applied to all layers (where it fits them all), for comparison."""
        m, rows = self.measurement, []
        for k, spec in enumerate(m.candidates):
            if any(layer.nbytes[k] is None for layer in m.layers):
                continue
            cost = sum(int(layer.nbytes[k]) for layer in m.layers)  # type: ignore[arg-type]
            error = sum(layer.predicted(k) or 0.0 for layer in m.layers)
            rows.append({"candidate": spec.describe(), **self.point(Solution([k] * len(m.layers), cost, error), False)})
        return rows

    def best_uniform(self) -> dict[str, Any] | None:
        """For comparison, the best single format for the same target: under a size bound, the uniform candidate
        with least predicted error that fits; under an error bound alone, the smallest that meets it."""
        limit, bound = self.target.get("budget_bytes"), self.target.get("max_error")
        rows = self.uniform()
        if limit is None and bound is not None:
            meets = [u for u in rows if u["predicted_error"] <= bound]
            return min(meets, key=lambda u: u["quantized_bytes"]) if meets else None
        fits = [u for u in rows if limit is None or u["quantized_bytes"] <= limit]
        return min(fits, key=lambda u: u["predicted_error"]) if fits else None

    def summary(self) -> dict[str, Any]:
        m, s = self.measurement, self.solution
        gap = None if s.lower_bound is None else max(0.0, s.error - s.lower_bound)
        return {
            **self.point(s, with_choices=False),
            "float_bytes": m.float_bytes, "quantized_params": m.numel, "layers": len(m.layers),
            **sens.describe_weighting(m.weighting),
            **({"predicted_kl": s.error} if m.weighting == "kl" else {}),
            "target": self.target,
            "solver": {"method": s.method, "exact": s.exact, "lower_bound": s.lower_bound, "gap": gap, **s.info},
            "spec_counts": dict(Counter(spec.describe() for spec in self.layer_specs.values()).most_common()),
            "best_uniform": self.best_uniform(), "front_points": len(self.front),
            **({"additivity": m.extra["additivity"]} if "additivity" in m.extra else {}),
        }

    def pareto_json(self) -> dict[str, Any]:
        m = self.measurement
        return {
            "format": PARETO_FORMAT, "version": 1, "provenance": m.provenance,
            **sens.describe_weighting(m.weighting),
            "layers": [layer.name for layer in m.layers], "numel": [layer.numel for layer in m.layers],
            "candidates": m.candidate_names, "float_bytes": m.float_bytes, "quantized_params": m.numel,
            "plan": {**self.point(self.solution), **self.summary()},
            "front": [self.point(p) for p in thin(self.front, MAX_FRONT_POINTS)],
            "uniform": self.uniform(),
            **self.extra,
        }


def make_plan(measurement: Measurement, *, target_bpw: float | None = None, budget_bytes: int | None = None,
              max_error: float | None = None, max_cells: int | None = None) -> Plan:
    """Solve for one candidate per layer.

    ``target_bpw`` (bits per weight over the planned layers) and/or ``budget_bytes`` (the whole model's
    stored size, float parts included) bound the size — the tighter wins — and the predicted error is
    minimised; ``max_error`` instead asks for the smallest plan whose predicted error is at most it
    (within the size bound, if one is also given).
    """
    from lowbit.plan.solve import MAX_CELLS

    m = measurement
    cells = max_cells or MAX_CELLS
    costs = [list(layer.nbytes) for layer in m.layers]
    errors = [[layer.predicted(k) for k in range(len(m.candidates))] for layer in m.layers]
    limits = []
    if target_bpw is not None:
        if target_bpw <= 0:
            raise InvalidSpecError(f"--target-bpw must be positive, got {target_bpw}")
        limits.append(int(target_bpw * m.numel // 8))
    if budget_bytes is not None:
        if budget_bytes <= m.float_bytes:
            raise InvalidSpecError(f"--budget {budget_bytes} bytes is not more than the model's float parts alone "
                                   f"({m.float_bytes} bytes: embeddings, norms, skipped layers)")
        limits.append(budget_bytes - m.float_bytes)
    if not limits and max_error is None:
        raise InvalidSpecError("give a size (--target-bpw or --budget) or an error bound (--max-kl / --max-error)")
    limit = min(limits) if limits else None
    smallest = sum(min(c for c in row if c is not None) for row in costs)  # type: ignore[type-var]
    if limit is not None and limit < smallest:
        raise InvalidSpecError(f"the size bound allows {8 * limit / m.numel:.3f} bits/weight over the planned layers; "
                               f"the smallest plan (every layer at its smallest candidate) needs "
                               f"{8 * smallest / m.numel:.3f} ({smallest} bytes)")
    target = {"target_bpw": target_bpw, "budget": budget_bytes, "max_error": max_error, "budget_bytes": limit}
    if max_error is not None:
        solution = solve_error_bound(costs, errors, max_error, max_cells=cells)
        if limit is not None and solution.cost > limit:
            best = solve_budget(costs, errors, limit, max_cells=cells)
            raise InvalidSpecError(f"no plan within the size bound ({limit} bytes of quantized layers) has predicted "
                                   f"error ≤ {max_error:g}; the least error within it is {best.error:.6g}")
    else:
        assert limit is not None
        solution = solve_budget(costs, errors, limit, max_cells=cells)
    front = pareto_hull(costs, errors)
    recipe = None if is_gguf(m.candidates) else plan_recipe(
        {layer.name: m.candidates[k] for layer, k in zip(m.layers, solution.choices)},
        m.provenance.get("method", "rtn"), m.provenance.get("options") or {}, m.candidates,
        tied_head="share" if m.provenance.get("tied_head") else "untie")
    return Plan(m, solution, front, target, recipe)


def quantized_bits_per_weight(model: nn.Module) -> float:
    """Bits per weight over the model's quantized layers — the planned ones, a planned (shared) head included."""
    from lowbit.nn.quant_linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    numel = sum(m.in_features * m.out_features for m in layers)
    return 8 * sum(m.weight.nbytes for m in layers) / numel if numel else 0.0


def gguf_plan_model(model_ref: str, gguf_types: dict[str, str]) -> nn.Module:
    """A float copy of ``model_ref`` holding exactly the weights a GGUF written with ``gguf_types`` stores (each
    planned layer quantized to its block type and dequantized; a tied head's type is the shared matrix's)."""
    from lowbit.io.checkpoint import load
    from lowbit.models.targets import float_weight, is_conv1d

    model = load(model_ref)
    with torch.no_grad():
        for name, qtype in gguf_types.items():
            module = model.get_submodule(name)
            approx = GGUFWeight.from_float(float_weight(module).float(), qtype.upper(), name).dequantize()
            module.weight.data = (approx.t().contiguous() if is_conv1d(module) else approx).to(module.weight.dtype)
    return model


def verify_plan(model_ref: str, reference: nn.Module, recipe: QuantRecipe | dict[str, str], tokenizer: Any,
                text_ids: torch.Tensor, *,
                calib: CalibConfig = CalibConfig(), seq_len: int = 256, batch_size: int = 8, device: str = "cpu",
                show_progress: bool = False) -> tuple[dict[str, Any], nn.Module]:
    """Quantize a fresh copy of ``model_ref`` with ``recipe`` (as ``lowbit quantize --recipe`` does; a dict of GGUF
    types: as ``lowbit export --plan`` rounds it) and measure it against the float ``reference`` on ``text_ids`` [T]:
    perplexity of both, mean KL, top-1 agreement, size (a GGUF plan's: the planned bytes and the float rest).

    Returns (report, the quantized model).
    """
    from lowbit.eval.kl import kl_divergence
    from lowbit.eval.size import model_size
    from lowbit.io.checkpoint import load
    from lowbit.quantize import quantize

    start = time.perf_counter()
    if isinstance(recipe, dict):
        model = gguf_plan_model(model_ref, recipe)
        bpw, size_bytes = None, None  # the plan's summary has the GGUF sizes
    else:
        model = load(model_ref)
        quantize(model, recipe, calibration=calib, tokenizer=tokenizer, device=device, show_progress=show_progress)
        bpw, size_bytes = round(quantized_bits_per_weight(model), 6), model_size(model).size_bytes
    model.to(next(reference.parameters()).device)
    kl = kl_divergence(model, reference, text_ids, seq_len=seq_len, batch_size=batch_size,
                       show_progress=show_progress)
    return ({"ppl": kl.ppl, "ppl_float": kl.reference_ppl, "kl": kl.kl, "kl_p99": kl.kl_p99,
             "top1_agreement": kl.top1_agreement, "tokens": kl.tokens, "seq_len": seq_len,
             "bits_per_weight": bpw, "size_bytes": size_bytes,
             "seconds": round(time.perf_counter() - start, 3)}, model)
