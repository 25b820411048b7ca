"""Gather a report's numbers: load the model and its float reference, measure, sweep uniform formats."""

from __future__ import annotations

import copy
import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError, ModelNotFoundError, UnsupportedModelError
from lowbit.formats.spec import QuantSpec
from lowbit.report.data import HistogramPanel, LayerRow, ReportData, SizePoint, SpeedRow
from lowbit.report.specs import DEFAULT_UNIFORM, parse_spec_name, short_name

DEFAULT_SUBJECT = "int4-g128"  # what a float model is shown quantized to when no plan is given


@dataclass
class ReportOptions:
    """What to measure. ``ppl_text``: a text file, ``"builtin"`` (tiny-lm's held-out text) or None
    (no perplexity); ``uniform``: formats to sweep the reference through (empty: none)."""

    reference: str | None = None
    plan: str | None = None
    measurements: str | None = None
    ppl_text: str | None = "builtin"
    seq_len: int = 256
    ppl_tokens: int | None = None
    uniform: tuple[QuantSpec, ...] = tuple(parse_spec_name(n) for n in DEFAULT_UNIFORM)
    speed: bool = True
    speed_tokens: int = 128
    compile: bool = True
    histograms: int = 3
    use_cache: bool = True
    show_progress: bool = True


class _Steps:
    """One progress bar over the report's steps, naming the current one (off when not enabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="report", unit="step", leave=False, dynamic_ncols=True)

    def run(self, desc: str, fn: Callable[[], Any]) -> Any:
        if self.bar is not None:
            self.bar.set_description(f"report: {desc}")
        try:
            return fn()
        finally:
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_report(model_ref: str | Path, options: ReportOptions | None = None) -> ReportData:
    """Measure what quantization did to ``model_ref`` (a lowbit quantized dir, a float model or
    ``builtin:NAME``): per-layer weight error vs the float reference, grids of representative
    groups, size and perplexity of uniform formats, speed. See :class:`ReportOptions`."""
    from lowbit import __version__
    from lowbit.io.checkpoint import load

    from lowbit.report.plan_files import read_plan

    opts = options or ReportOptions()
    _check_options(opts)
    plan = read_plan(opts.plan, opts.measurements)  # bad plan files fail before any model is loaded
    start = time.perf_counter()
    steps = _Steps(6 + len(opts.uniform) + (2 if opts.speed else 0), opts.show_progress)
    try:
        model = steps.run("load model", lambda: load(model_ref))
        _check_model(model, str(model_ref))
        quantized = _is_quantized(model)
        data = ReportData(model=str(model_ref), model_dir=str(model.lowbit_source), reference=None,
                          quantized=quantized, subject="", method=getattr(model, "lowbit_method", None) or "none",
                          params=0, size_bytes=0, linear_bytes=0, bits_per_weight=0.0, lowbit_version=__version__,
                          created=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        model_speed = None
        if opts.speed:  # before anything else is loaded: the peak memory is this model's alone
            label = "quantized" if quantized else "float"
            model_speed = steps.run("speed (model)", lambda: _speed(model, label, opts, data))
        reference, reference_ref = steps.run("load reference", lambda: _load_reference(model, model_ref, opts, data))
        data.plan = None if plan.recipe_path is None else str(plan.recipe_path)
        data.plan_front, data.plan_uniform, data.plan_error_unit = plan.front, plan.uniform, plan.error_unit
        data.predicted_kind = plan.measurement_kind
        ids = _token_ids(model, opts, data) if opts.ppl_text is not None else None
        ppl_fn = _ppl_fn(ids, opts.seq_len) if ids is not None else None
        fingerprint = _fingerprint(reference_ref)
        uniform = {}
        for spec in opts.uniform:
            uniform[spec] = steps.run(f"uniform {short_name(spec)}", lambda spec=spec: _uniform(
                reference, spec, fingerprint, ppl_fn, ids, opts, data))
        subject, subject_spec = steps.run("subject", lambda: _subject(model, reference, quantized, plan, opts, data))
        steps.run("per-layer error", lambda: _layer_rows(subject, reference, plan, uniform, data))
        steps.run("perplexity", lambda: _perplexities(subject, reference, subject_spec, uniform, ppl_fn, ids,
                                                       fingerprint, opts, data))
        _sizes(subject, reference, reference_ref, uniform, data)
        steps.run("histograms", lambda: _histograms(subject, reference, opts.histograms, data))
        if opts.speed:
            steps.run("speed (comparison)", lambda: _speed_rows(subject, reference, quantized, model_speed, opts, data))
    finally:
        steps.close()
    if data.method in ("awq", "smoothquant", "static"):
        data.notes.append(f"{data.method} rescales weights (folding activation scales into neighbouring layers), "
                          "so part of the per-layer weight error is that rescaling, not rounding.")
    data.seconds = round(time.perf_counter() - start, 3)
    return data


# ---- steps ---------------------------------------------------------------------------------
def _check_options(opts: ReportOptions) -> None:
    if opts.seq_len < 2:
        raise InvalidSpecError(f"--seq-len must be ≥ 2, got {opts.seq_len}")
    if opts.ppl_tokens is not None and opts.ppl_tokens < 2:
        raise InvalidSpecError(f"--ppl-tokens must be ≥ 2, got {opts.ppl_tokens}")
    if opts.speed_tokens < 1:
        raise InvalidSpecError(f"--speed-tokens must be ≥ 1, got {opts.speed_tokens}")
    if opts.histograms < 0:
        raise InvalidSpecError(f"--histograms must be ≥ 0, got {opts.histograms}")
    if opts.ppl_text not in (None, "builtin") and not Path(str(opts.ppl_text)).is_file():
        raise ModelNotFoundError(f"{opts.ppl_text}: text file not found (--ppl)")


def _check_model(model: nn.Module, name: str) -> None:
    from lowbit.models.targets import linear_modules

    get = getattr(model, "get_output_embeddings", None)
    if get is None or get() is None:
        raise UnsupportedModelError(f"{name}: lowbit report needs a causal language model (this one has no LM head); "
                                    "use `lowbit eval --similarity` for encoders")
    if not linear_modules(model):
        raise UnsupportedModelError(f"{name}: the model has no linear layers to report on")


def _is_quantized(model: nn.Module) -> bool:
    from lowbit.nn.quant_linear import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def _recorded_source(model: nn.Module) -> str | None:
    from lowbit.models.resolve import read_json

    try:
        qcfg = read_json(Path(model.lowbit_source) / "config.json").get("quantization_config") or {}
    except LowbitError:
        return None
    source = qcfg.get("source") if isinstance(qcfg, dict) else None
    return source if isinstance(source, str) and source else None


def _load_reference(model: nn.Module, model_ref: str | Path, opts: ReportOptions,
                    data: ReportData) -> tuple[nn.Module, str]:
    from lowbit.io.checkpoint import load

    if not data.quantized:
        if opts.reference is not None:
            data.notes.append(f"{model_ref} is a float model: it is its own reference (--reference "
                              f"{opts.reference} ignored).")
        data.reference = str(model_ref)
        return model, str(model_ref)
    ref = opts.reference
    if ref is None:
        source = _recorded_source(model)
        if source is None:
            raise LowbitError(f"{model_ref}: a quantized model that does not record the float model it came from; "
                              "pass --reference FLOAT_MODEL to compare against")
        ref = _existing_source(source, Path(model.lowbit_source))
        if ref is None:
            raise ModelNotFoundError(f"{model_ref}: its float reference {source} (recorded in config.json) is not "
                                     "available here; pass --reference FLOAT_MODEL")
    reference = load(ref)
    if _is_quantized(reference):
        raise UnsupportedModelError(f"{ref}: the reference is itself quantized; pass the float model with --reference")
    data.reference = str(ref)
    return reference, str(ref)


def _existing_source(source: str, model_dir: Path) -> str | None:
    if source.startswith("builtin:"):
        return source
    for candidate in (Path(source).expanduser(), model_dir.parent / source):
        if candidate.exists():
            return str(candidate)
    return None


def _token_ids(model: nn.Module, opts: ReportOptions, data: ReportData) -> torch.Tensor:
    from lowbit.eval.perplexity import read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    path = builtin_dir("tiny-lm") / "eval.txt" if opts.ppl_text == "builtin" else Path(str(opts.ppl_text))
    ids = tokenize_text(load_tokenizer(model), read_text(path))
    if opts.ppl_tokens is not None:
        ids = ids[: opts.ppl_tokens]
    if ids.numel() < 2:
        raise InvalidSpecError(f"{path}: too short for perplexity (fewer than 2 tokens)")
    data.ppl_text = "built-in held-out text" if opts.ppl_text == "builtin" else str(path)
    data.seq_len = opts.seq_len
    return ids


def _ppl_fn(ids: torch.Tensor, seq_len: int) -> Callable[[nn.Module], float]:
    from lowbit.eval.perplexity import perplexity

    def measure(m: nn.Module) -> float:
        return perplexity(m, ids, seq_len=seq_len, show_progress=False).ppl
    return measure


def _fingerprint(reference_ref: str) -> str | None:
    from lowbit.models.resolve import resolve_model_dir
    from lowbit.report.sweep import model_fingerprint

    try:
        return model_fingerprint(resolve_model_dir(reference_ref))
    except (LowbitError, OSError):
        return None


def _uniform(reference: nn.Module, spec: QuantSpec, fingerprint: str | None, ppl_fn: Any, ids: Any,
             opts: ReportOptions, data: ReportData) -> Any:
    from lowbit.report.sweep import uniform_result

    try:
        return uniform_result(reference, spec, fingerprint=fingerprint, ppl_fn=ppl_fn, ids=ids,
                              seq_len=opts.seq_len, use_cache=opts.use_cache)
    except LowbitError as exc:  # e.g. a group size that does not divide some layer
        data.notes.append(f"uniform {short_name(spec)} skipped: {exc}")
        return None


def _subject(model: nn.Module, reference: nn.Module, quantized: bool, plan: Any, opts: ReportOptions,
             data: ReportData) -> tuple[nn.Module, QuantSpec | None]:
    """The quantized model the page is about, and its single spec when it is a uniform what-if."""
    from lowbit.quantize import quantize
    from lowbit.recipe import QuantRecipe

    if quantized:
        data.subject = data.method if data.method != "none" else "quantized"
        return model, None
    if plan.recipe is not None:
        recipe = plan.recipe
        if recipe.method not in ("rtn",):
            data.notes.append(f"the plan's method is {recipe.method}; this what-if applies its formats with RTN.")
        recipe = QuantRecipe(recipe.default, "rtn", recipe.skip, recipe.include, recipe.overrides)
        data.subject = f"plan {Path(str(data.plan)).name} (RTN what-if)"
        data.method = "rtn"
        return quantize(copy.deepcopy(reference), recipe), None
    spec = next((s for s in opts.uniform if s.format == "int" and s.bits == 4), parse_spec_name(DEFAULT_SUBJECT))
    data.subject = f"{short_name(spec)} (RTN what-if)"
    data.method = "rtn"
    data.notes.append(f"{data.model} is a float model: the plots show what uniform formats would do to it; the header "
                      f"and per-layer plots show {short_name(spec)} by round-to-nearest.")
    return quantize(copy.deepcopy(reference), spec), spec


def _layer_rows(subject: nn.Module, reference: nn.Module, plan: Any, uniform: dict[QuantSpec, Any],
                data: ReportData) -> None:
    from lowbit.models.build import output_head_name
    from lowbit.models.targets import float_weight, linear_modules
    from lowbit.nn.quant_linear import QuantLinear
    from lowbit.report.measure import layer_params, reference_weight, relative_error

    head = output_head_name(subject)
    method = data.method if data.method != "none" else "rtn"
    for name, module in linear_modules(subject).items():
        if isinstance(module, QuantLinear):
            qw = module.weight
            err = relative_error(reference_weight(reference, name, qw.shape), qw.dequantize())
            spec = module.spec
            row = LayerRow(name, spec.describe(), short_name(spec), method, round(qw.bits_per_weight, 4),
                           layer_params(module), err)
            row.predicted_error = plan.predicted_error(name, (spec.describe(), short_name(spec)))
        elif name == head:
            continue  # a float output head: not one of the weights bits/weight counts
        else:
            w = float_weight(module)
            ref_w = reference_weight(reference, name, tuple(w.shape))
            err = relative_error(ref_w, w)
            row = LayerRow(name, None, "float", "none", 8.0 * w.element_size(), layer_params(module), err)
        for spec, result in uniform.items():
            if result is not None and name in result.layer_errors:
                row.uniform_errors[short_name(spec)] = result.layer_errors[name]
        data.layers.append(row)


def _perplexities(subject: nn.Module, reference: nn.Module, subject_spec: QuantSpec | None,
                  uniform: dict[QuantSpec, Any], ppl_fn: Any, ids: Any, fingerprint: str | None,
                  opts: ReportOptions, data: ReportData) -> None:
    from lowbit.report.sweep import reference_ppl

    if ppl_fn is None:
        return
    data.ppl_tokens = int(ids.numel())
    data.ppl_reference, _ = reference_ppl(reference, fingerprint=fingerprint, ppl_fn=ppl_fn, ids=ids,
                                          seq_len=opts.seq_len, use_cache=opts.use_cache)
    reuse = uniform.get(subject_spec) if subject_spec is not None else None
    data.ppl = reuse.ppl if reuse is not None and reuse.ppl is not None else ppl_fn(subject)


def _reference_bits(reference_ref: str, reference: nn.Module) -> float:
    """Bits per stored float weight of the reference checkpoint (its config's dtype; loaded as fp32)."""
    from lowbit.models.resolve import read_json, resolve_model_dir

    try:
        config = read_json(resolve_model_dir(reference_ref) / "config.json")
    except LowbitError:
        return 32.0
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return 16.0 if dtype in ("float16", "bfloat16", "half") else 32.0


def _sizes(subject: nn.Module, reference: nn.Module, reference_ref: str, uniform: dict[QuantSpec, Any],
           data: ReportData) -> None:
    from lowbit.eval.size import model_size

    size = model_size(subject)
    data.params, data.size_bytes, data.linear_bytes = size.params, size.size_bytes, size.linear_bytes
    data.bits_per_weight = size.bits_per_weight
    ref_size = model_size(reference)
    scale = _reference_bits(reference_ref, reference) / 32.0
    data.reference_size_bytes = int(ref_size.size_bytes * scale)
    data.reference_bits_per_weight = round(ref_size.bits_per_weight * scale, 4)
    data.points.append(SizePoint("float reference", "reference", data.reference_bits_per_weight,
                                 data.reference_size_bytes, data.ppl_reference))
    for spec, result in uniform.items():
        if result is not None:
            data.points.append(SizePoint(short_name(spec), "uniform", result.bits_per_weight, result.size_bytes,
                                         result.ppl, result.cached))
    kind = "model" if data.quantized else ("plan" if data.plan else "what-if")
    label = Path(data.model_dir).name if data.quantized else data.subject
    data.points.append(SizePoint(label, kind, data.bits_per_weight, data.size_bytes, data.ppl))


def _histograms(subject: nn.Module, reference: nn.Module, count: int, data: ReportData) -> None:
    from lowbit.report.measure import (grid_values, group_columns, histogram_values, median_group,
                                       reference_weight, representative_layers)

    errors = {r.name: r.rel_error for r in data.layers if r.spec is not None and r.rel_error is not None}
    for name, role in representative_layers(errors, count):  # type: ignore[arg-type]
        module = subject.get_submodule(name)
        qw = module.weight
        w = reference_weight(reference, name, qw.shape)
        w_hat = qw.dequantize()
        row, group, gerr = median_group(w, w_hat, qw.spec)
        if qw.spec.granularity == "tensor":
            row = 0
        data.histograms.append(HistogramPanel(
            name, qw.spec.describe(), role, row, group, group_columns(qw.spec, qw.shape, group), errors[name], gerr,
            histogram_values(w, qw.spec, row, group), grid_values(qw, row, group)))


def _speed(model: nn.Module, label: str, opts: ReportOptions, data: ReportData) -> SpeedRow | None:
    from lowbit.eval.size import model_size
    from lowbit.eval.speed import measure_speed

    try:
        r = measure_speed(model, prompt_tokens=min(128, opts.speed_tokens), new_tokens=opts.speed_tokens,
                          compile=opts.compile)
    except LowbitError as exc:
        data.notes.append(f"speed of {label} not measured: {exc}")
        return None
    return SpeedRow(label, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.peak_memory_bytes,
                    model_size(model).size_bytes, r.compiled, r.device)


def short_label(subject: str) -> str:
    """``int4-g128`` of ``int4-g128 (RTN what-if)``: short enough for a bar label."""
    return subject.split(" ")[0] if subject else "quantized"


def _speed_rows(subject: nn.Module, reference: nn.Module, quantized: bool, model_speed: SpeedRow | None,
                opts: ReportOptions, data: ReportData) -> None:
    """The model's own speed (measured first) and the float reference's / the what-if's for comparison.

    The comparison row has no peak memory: by the time it runs, the report holds both models.
    """
    if quantized:
        other = _speed(reference, "float", opts, data)
    else:
        other = _speed(subject, short_label(data.subject), opts, data)
    if other is not None:
        other.peak_memory_bytes = None
    data.speed = [r for r in (model_speed, other) if r is not None]
