"""Sensitivity measurement: every quantizable layer's output error at every candidate format, and its exact size.

Measured once, saved as JSON, optimised separately (exllamav2's conversion/ split): the solver
(:mod:`lowbit.plan.solve`) never touches the model.

**Error metric.** For a linear layer with weight W [N, K] and calibration inputs x (the rows its
real block inputs present to it), GPTQ's Hessian H = 2/n · Σ xᵀx [K, K] gives the layer's output
error in closed form:

    E(Ŵ) = tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)   = Σ_t ‖(W − Ŵ) x_t‖² / Σ_t ‖W x_t‖²

the relative squared error of the layer's *output* on its real inputs (not of its weights: a
column whose inputs are large costs more). One H per layer (inputs captured once per block by
:func:`lowbit.algorithms.calibrate.run_layer_by_layer`, all layers of the model kept float so every
layer sees the float model's inputs), then one product with H per candidate. It is the exact output
error on the calibration data, not a proxy, and costs no extra forward pass; a second-order estimate
of the *loss* would need the loss's curvature at every layer's output instead. How a layer's output
error becomes model error is the weighting's job (:mod:`lowbit.plan.sensitivity`). GPTQ candidates
are measured on float inputs; when applied, GPTQ runs on the already-quantized earlier blocks'
outputs, so GPTQ plans come out somewhat worse than predicted (``--verify`` shows by how much).

**Cost.** The candidate's :attr:`QuantizedWeight.nbytes` — packed codes + scales + zero-points,
exactly what ``lowbit quantize`` stores — measured on the quantized weight itself (HQQ stores
float16 zero-points, so its cost is not the spec's nominal one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import CorruptFileError, InvalidSpecError, ShapeError
from lowbit.formats.names import parse_spec_name
from lowbit.formats.spec import QuantSpec
from lowbit.tensor import QuantizedWeight

MEASURE_FORMAT = "lowbit-plan-measure"
MEASURE_VERSION = 1
PLAN_METHODS = ("rtn", "hqq", "gptq")

# ~2–8 bits in steps of ~0.1–0.3 bits/weight. Scales are double-quantized (8-bit, blocks of 256, as in
# QLoRA): on the built-in LM that makes groups of 32 cost what plain groups of 64 do (int3: 3.35 vs 3.34
# bits/weight) at ~20 % less output error, and every plain int candidate was off every layer's
# (size, error) hull once its -dq twin was measured. fp8 never reaches the hull either (int8-ch-sym: same
# size, 15× less error) but is kept in rtn's list as the float alternative.
_INT_LADDER = ("int2-g128-asym-dq", "int2-g64-asym-dq", "int2-g32-asym-dq",
               "int3-g128-asym-dq", "int3-g64-asym-dq", "int3-g32-asym-dq",
               "int4-g64-asym-dq", "int4-g32-asym-dq", "int5-g64-asym-dq", "int5-g32-asym-dq", "int6-g64-asym-dq")
DEFAULT_CANDIDATES: dict[str, tuple[str, ...]] = {
    "rtn": _INT_LADDER + ("nf4-b64-dq", "int8-ch-sym", "fp8_e4m3-ch"),
    "hqq": _INT_LADDER + ("int4-g128-asym-dq", "int8-ch-asym"),  # HQQ optimises zero-points: asymmetric int only
    "gptq": _INT_LADDER + ("int4-g128-asym-dq", "int8-ch-sym"),  # GPTQ: int formats only (no nf4/fp8 path)
}


# ---- candidates -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFCandidate:
    """A GGUF block type (``q4_k``, ``q6_k``, ``q8_0`` …) as a plan candidate: measured with lowbit's
    byte-exact llama.cpp quantizer; a plan of them is applied by ``lowbit export --format gguf --plan``."""

    qtype: str  # "Q4_K"

    def describe(self) -> str:
        return self.qtype.lower()

    def to_dict(self) -> dict[str, Any]:
        return {"gguf": self.qtype}


Candidate = QuantSpec | GGUFCandidate
GGUF_CANDIDATES = ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")


class GGUFWeight:
    """A weight stored as GGUF blocks: what the measurement needs of it (bytes, dequantized values)."""

    def __init__(self, qtype: str, data: torch.Tensor, shape: tuple[int, int]) -> None:
        self.qtype, self.data, self.shape = qtype, data, shape

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: str, name: str = "weight") -> "GGUFWeight":
        from lowbit.io.gguf import quants

        return cls(qtype, quants.quantize(weight, qtype, name=name), (int(weight.shape[0]), int(weight.shape[1])))

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from lowbit.io.gguf import quants

        return quants.dequantize(self.data, self.qtype, self.shape).to(dtype)

    def to(self, device: Any) -> "GGUFWeight":
        return self


def is_gguf(candidates: list[Candidate]) -> bool:
    """Whether the candidates are GGUF block types (a list is all of one kind: the plan's output differs)."""
    return bool(candidates) and isinstance(candidates[0], GGUFCandidate)


def candidate_from_dict(d: dict[str, Any], where: str) -> Candidate:
    if "gguf" in d:
        return parse_gguf_candidate(str(d["gguf"]), where)
    return QuantSpec.from_dict(d["spec"], where)


def parse_gguf_candidate(name: str, where: str = "candidate") -> GGUFCandidate:
    if name.strip().lower() not in GGUF_CANDIDATES:
        raise InvalidSpecError(f"{where}: {name!r} is not a GGUF block type; choose from {', '.join(GGUF_CANDIDATES)}")
    return GGUFCandidate(name.strip().upper())


def parse_candidates(text: str | list[str] | tuple[str, ...] | None, method: str) -> list[Candidate]:
    """Candidates from comma-separated names (None: the method's default list), checked for ``method``.

    Names are lowbit formats (``int3-g64-asym-dq``, ``nf4-b64`` …: a plan → a recipe for ``lowbit quantize``)
    or GGUF block types (``q3_k,q4_k,q6_k`` …, method rtn: a plan → per-tensor types for ``lowbit export``);
    one kind per list.
    """
    if method not in PLAN_METHODS:
        raise InvalidSpecError(f"plan: method {method!r} is not supported; choose one of {', '.join(PLAN_METHODS)}")
    if text is None:
        names: list[str] = list(DEFAULT_CANDIDATES[method])
    elif isinstance(text, str):
        names = [n for n in (s.strip() for s in text.split(",")) if n]
    else:
        names = [str(n) for n in text]
    specs: list[Candidate] = []
    for name in names:
        spec = (parse_gguf_candidate(name) if name.strip().lower() in GGUF_CANDIDATES
                else parse_spec_name(name))
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise InvalidSpecError("plan: the candidate list is empty")
    if len({isinstance(s, GGUFCandidate) for s in specs}) > 1:
        raise InvalidSpecError("plan: candidates mix GGUF block types and lowbit formats; a plan is either a recipe "
                               "for lowbit quantize or per-tensor GGUF types for lowbit export — give one kind")
    if is_gguf(specs):
        if method != "rtn":
            raise InvalidSpecError(f"GGUF candidates are quantized the way llama.cpp does it (--method rtn), "
                                   f"not {method}")
        return specs
    for spec in specs:
        assert isinstance(spec, QuantSpec)
        if method == "gptq" and (spec.format != "int" or spec.granularity == "tensor"):
            raise InvalidSpecError(f"candidate {spec.describe()}: GPTQ quantizes int formats with per-channel or "
                                   "per-group scales only (a recipe has one method); drop it or use --method rtn")
        if method == "hqq" and (spec.format != "int" or spec.symmetric or spec.granularity == "tensor"):
            raise InvalidSpecError(f"candidate {spec.describe()}: HQQ quantizes asymmetric int formats with "
                                   "per-channel or per-group scales only; drop it or use --method rtn")
    return specs


# ---- the measurement record ---------------------------------------------------------------
@dataclass
class LayerMeasurement:
    """One layer's error and cost at each candidate (lists indexed like ``Measurement.candidates``)."""

    name: str
    shape: tuple[int, int]                 # [out_features, in_features]
    energy: float                          # tr(W H Wᵀ): the layer's output energy on its calibration inputs
    rel_error: list[float | None]          # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ); None: the candidate does not fit the layer
    nbytes: list[int | None]               # QuantizedWeight.nbytes (codes + scales + zero-points)
    sensitivity: float = 1.0               # model error per unit of rel_error (see lowbit.plan.sensitivity)
    reference: int | None = None           # the candidate the end-to-end check quantized this layer with
    reference_kl: float | None = None      # the model's KL with only this layer at ``reference``

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def predicted(self, k: int) -> float | None:
        """Predicted model error with this layer at candidate ``k`` (None: not applicable)."""
        e = self.rel_error[k]
        return None if e is None else self.sensitivity * e

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "energy": self.energy, "rel_error": self.rel_error,
                "nbytes": self.nbytes, "sensitivity": self.sensitivity, "reference": self.reference,
                "reference_kl": self.reference_kl}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerMeasurement":
        return cls(str(d["name"]), (int(d["shape"][0]), int(d["shape"][1])), float(d["energy"]),
                   [None if e is None else float(e) for e in d["rel_error"]],
                   [None if b is None else int(b) for b in d["nbytes"]], float(d["sensitivity"]),
                   d.get("reference"), d.get("reference_kl"))


@dataclass
class Measurement:
    """Everything the solver needs, with the provenance that decides whether a cached copy can be reused.

    ``float_bytes``: what the quantized model stores besides the target layers' weights (embeddings,
    norms, skipped layers, biases), so a size budget covers the whole model.
    """

    provenance: dict[str, Any]
    candidates: list[Candidate]
    layers: list[LayerMeasurement]
    float_bytes: int
    weighting: str                         # "kl": predicted errors are KL (nats/token); "relative": Σ rel_error
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def candidate_names(self) -> list[str]:
        return [s.describe() for s in self.candidates]

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"format": MEASURE_FORMAT, "version": MEASURE_VERSION, "provenance": self.provenance,
                "candidates": [{"name": s.describe(), **({"spec": s.to_dict()} if isinstance(s, QuantSpec)
                                                                   else s.to_dict())} for s in self.candidates],
                "float_bytes": self.float_bytes, "weighting": self.weighting, "seconds": round(self.seconds, 3),
                "extra": self.extra, "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "measurement") -> "Measurement":
        if not isinstance(d, dict) or d.get("format") != MEASURE_FORMAT:
            raise CorruptFileError(f"{where}: not a lowbit plan measurement (format != {MEASURE_FORMAT!r})")
        if d.get("version") != MEASURE_VERSION:
            raise CorruptFileError(f"{where}: measurement version {d.get('version')!r}, expected {MEASURE_VERSION}")
        try:
            candidates = [candidate_from_dict(c, f"{where}: candidates[{i}]") for i, c in enumerate(d["candidates"])]
            layers = [LayerMeasurement.from_dict(x) for x in d["layers"]]
            m = cls(dict(d["provenance"]), candidates, layers, int(d["float_bytes"]), str(d["weighting"]),
                    float(d.get("seconds", 0.0)), dict(d.get("extra") or {}))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CorruptFileError(f"{where}: malformed measurement ({type(exc).__name__}: {exc})") from None
        for layer in m.layers:
            if len(layer.rel_error) != len(candidates) or len(layer.nbytes) != len(candidates):
                raise CorruptFileError(f"{where}: layer {layer.name} has {len(layer.rel_error)} errors for "
                                       f"{len(candidates)} candidates")
        return m

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Measurement":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{path}: cannot read measurement ({exc})") from None
        return cls.from_dict(data, str(path))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_text_atomic(path: Path, text: str, check: Callable[[Path], None] | None = None) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, optionally ``check`` it, rename it into place.

    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent, suffix=path.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- provenance ---------------------------------------------------------------------------
def model_fingerprint(model_dir: Path) -> str:
    """sha256 of config.json and the weight files' names and sizes (cheap; changes when the checkpoint does)."""
    from lowbit.io.safetensors_io import weight_files

    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in weight_files(model_dir):
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:20]


def tensor_hash(ids: torch.Tensor) -> str:
    """sha256 of a token-id tensor: covers the calibration source, windows, seed and tokenizer at once."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:20]


# ---- measuring ----------------------------------------------------------------------------
def layer_quantizer(method: str, options: dict[str, Any] | None = None
                    ) -> Callable[[torch.Tensor, torch.Tensor, QuantSpec, str], QuantizedWeight]:
    """(weight [N, K], Hessian [K, K], spec, name) → QuantizedWeight, as ``lowbit quantize --method`` would."""
    from lowbit.algorithms.weight_only import method_config
    from lowbit.recipe import QuantRecipe

    config = method_config(QuantRecipe(QuantSpec(), method, options=tuple(sorted((options or {}).items()))))

    def quantize(w: torch.Tensor, h: torch.Tensor, spec: Any, name: str) -> Any:
        if isinstance(spec, GGUFCandidate):
            return GGUFWeight.from_float(w, spec.qtype, name)
        return plain(w, h, spec, name)

    plain = _layer_quantizer(method, config)
    return quantize


def _layer_quantizer(method: str, config: Any) -> Callable[[torch.Tensor, torch.Tensor, QuantSpec, str], QuantizedWeight]:
    if method == "gptq":
        from lowbit.algorithms.gptq import gptq_quantize

        return lambda w, h, spec, name: gptq_quantize(w, h, spec, config, name)
    if method == "hqq":
        from lowbit.algorithms.hqq import hqq_quantize

        return lambda w, h, spec, name: hqq_quantize(w, spec, config, name)
    return lambda w, h, spec, name: QuantizedWeight.from_float(w, spec, name)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) for W, Ŵ [N, K] and H [K, K] (float64 accumulation)."""
    delta = (weight - approx).double()
    return float(((delta @ hessian.double()) * delta).sum())


def measure_layer(weight: torch.Tensor, hessian: torch.Tensor, candidates: list[QuantSpec],
                  quantizer: Callable[[torch.Tensor, torch.Tensor, QuantSpec, str], QuantizedWeight], name: str,
                  keep: Callable[[list[float | None]], int | None] | None = None
                  ) -> tuple[LayerMeasurement, QuantizedWeight | None]:
    """Quantize ``weight`` [N, K] at every candidate and measure output error and stored bytes.

    ``keep(rel_errors)`` names the candidate whose QuantizedWeight is returned (the end-to-end check's
    reference); it is quantized once more then, so only one quantized copy is ever alive.
    """
    w = weight.detach().float()
    energy = output_error(w, torch.zeros_like(w), hessian)
    errors: list[float | None] = []
    sizes: list[int | None] = []
    for spec in candidates:  # one quantized copy alive at a time
        qw = _quantize_or_none(quantizer, w, hessian, spec, name)
        error = None if qw is None else output_error(w, qw.dequantize(torch.float32), hessian)
        errors.append(None if error is None else error / max(energy, 1e-30))
        sizes.append(None if qw is None else qw.nbytes)
        del qw
    if all(e is None for e in errors):
        raise ShapeError(f"{name}: no candidate format fits this layer (weight {tuple(w.shape)}); add one whose group "
                         f"size divides {w.shape[1]}, e.g. int4-ch-asym")
    chosen = keep(errors) if keep is not None else None
    kept = _quantize_or_none(quantizer, w, hessian, candidates[chosen], name) if chosen is not None else None
    return LayerMeasurement(name, (int(w.shape[0]), int(w.shape[1])), energy, errors, sizes), kept


def _quantize_or_none(quantizer: Callable[[torch.Tensor, torch.Tensor, QuantSpec, str], QuantizedWeight],
                      w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str) -> QuantizedWeight | None:
    """The quantized weight, or None when the candidate does not fit the layer's shape."""
    if getattr(spec, "granularity", None) == "group" and w.shape[1] % spec.group_size:
        return None
    try:
        return quantizer(w, hessian, spec, name)
    except ShapeError:
        return None


def measure_layers(model: nn.Module, batches: list[dict[str, torch.Tensor]], targets: list[str],
                   candidates: list[QuantSpec], method: str, options: dict[str, Any] | None = None, *,
                   device: str | torch.device = "cpu",
                   keep: Callable[[list[float | None]], int | None] | None = None, inputs: str = "float",
                   show_progress: bool = False) -> tuple[dict[str, LayerMeasurement], dict[str, QuantizedWeight]]:
    """Measure every target layer on the calibration ``batches`` with the shared layer-by-layer runner.

    The runner captures each block's inputs once and feeds every target layer's inputs to a Hessian;
    the layers are measured and left float (``replace`` hands back the same module), so each block
    sees the float model's activations. Targets outside the block list (rare: a BERT pooler) have no
    captured inputs and are measured in weight space (H = I).
    ``inputs="reference"``: each block instead sees the outputs of the earlier blocks with their layers at
    their reference candidates (``keep``) — the regime a sequentially applied method (GPTQ) meets; the float
    weights are put back afterwards.
    Returns ({name: measurement}, {name: kept reference QuantizedWeight}).
    """
    from lowbit.algorithms.calibrate import LayerJob, run_layer_by_layer
    from lowbit.algorithms.gptq import HessianAccumulator
    from lowbit.models.targets import float_weight, is_conv1d, linear_dims

    quantizer = layer_quantizer(method, options)
    results: dict[str, LayerMeasurement] = {}
    kept: dict[str, QuantizedWeight] = {}

    def make_stats(name: str, module: nn.Module) -> Any:
        return HessianAccumulator(linear_dims(module)[0], device=device)

    if inputs not in ("float", "reference"):
        raise InvalidSpecError(f"measurement inputs {inputs!r}: choose float or reference")
    originals: dict[str, torch.Tensor] = {}

    def replace(job: LayerJob) -> nn.Module:
        layer, qw = measure_layer(float_weight(job.module), job.stats.hessian, candidates, quantizer, job.name, keep)
        job.stats.hessian = None
        results[job.name] = layer
        if qw is not None:
            kept[job.name] = qw.to("cpu")
            if inputs == "reference":  # the later blocks see this layer quantized
                originals[job.name] = job.module.weight.data
                approx = qw.dequantize(torch.float32).to(job.module.weight.device, job.module.weight.dtype)
                job.module.weight.data = approx.t().contiguous() if is_conv1d(job.module) else approx
        return job.module

    wanted = {name: None for name in targets}
    try:
        run_layer_by_layer(model, batches, targets=wanted, make_stats=make_stats, replace=replace, device=device,
                           sequential=inputs == "reference", show_progress=show_progress)
    finally:
        for name, weight in originals.items():
            model.get_submodule(name).weight.data = weight
    for name in targets:
        if name not in results:
            module = model.get_submodule(name)
            w = float_weight(module).float()
            layer, qw = measure_layer(w, torch.eye(w.shape[1]), candidates, quantizer, name, keep)
            results[name] = layer
            if qw is not None:
                kept[name] = qw
    return results, kept
