"""The numbers a report shows, gathered once and rendered by :mod:`lowbit.report.html`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lowbit.report.plan_files import PlanPoint


@dataclass
class LayerRow:
    """One linear layer: how it is stored and how far its weight moved from the float reference.

    ``rel_error`` is ‖W − Ŵ‖_F / ‖W‖_F (None without a reference; 0 for layers kept in float);
    ``predicted_error`` is the planner's measured output error for the layer's spec, when given;
    ``uniform_errors`` the relative weight error each uniform format would give this layer.
    """

    name: str
    spec: str | None          # QuantSpec.describe(); None: kept in float
    label: str                # short format label used for colours and legends
    method: str
    bits_per_weight: float    # stored bits per weight, scales and zero-points included
    params: int
    rel_error: float | None = None
    predicted_error: float | None = None
    uniform_errors: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass
class SizePoint:
    """A model variant on the size-vs-perplexity plot."""

    label: str
    kind: str                 # model | reference | uniform | plan
    bits_per_weight: float
    size_bytes: int
    ppl: float | None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass
class HistogramPanel:
    """Float weights of one group of one layer, with the dequantized grid of that group.

    ``values`` are the float weights (not serialised by :meth:`to_dict`); ``grid`` the values the
    group's codes decode to: scale·(q − z) for int, codebook·absmax for nf4/fp4, scaled float8 values.
    """

    layer: str
    spec: str
    role: str                 # worst | median | best
    row: int
    group: int
    columns: tuple[int, int]  # [start, end) input columns of the group
    rel_error: float | None
    group_error: float
    values: list[float] = field(default_factory=list, repr=False)
    grid: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("values")
        data["grid_points"] = len(data.pop("grid"))
        data["columns"] = list(self.columns)
        return _clean(data)


@dataclass
class SpeedRow:
    label: str
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    peak_memory_bytes: int | None
    weight_bytes: int
    compiled: bool | None = None
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass
class ReportData:
    """Everything on the page. ``subject`` is the quantized model the page is about: the model
    itself when it is quantized, else what the plan (or int4-g128) would make of the float model."""

    model: str
    model_dir: str
    reference: str | None
    quantized: bool
    subject: str
    method: str
    params: int
    size_bytes: int
    linear_bytes: int
    bits_per_weight: float
    reference_size_bytes: int | None = None
    reference_bits_per_weight: float | None = None
    ppl: float | None = None
    ppl_reference: float | None = None
    ppl_tokens: int | None = None
    ppl_text: str | None = None
    seq_len: int | None = None
    layers: list[LayerRow] = field(default_factory=list)
    points: list[SizePoint] = field(default_factory=list)
    plan_front: list[PlanPoint] = field(default_factory=list)
    plan_uniform: list[PlanPoint] = field(default_factory=list)  # the planner's predictions for uniform formats
    plan_error_unit: str | None = None
    predicted_kind: str = "predicted error"  # what LayerRow.predicted_error measures
    plan: str | None = None
    histograms: list[HistogramPanel] = field(default_factory=list)
    speed: list[SpeedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lowbit_version: str = ""
    created: str = ""
    seconds: float = 0.0

    @property
    def format_mix(self) -> list[tuple[str, int, float]]:
        """(format label, layers, share of the linear weights) for the quantized and float layers."""
        total = sum(r.params for r in self.layers) or 1
        mix: dict[str, list[int]] = {}
        for r in self.layers:
            entry = mix.setdefault(r.label, [0, 0])
            entry[0] += 1
            entry[1] += r.params
        return sorted(((k, v[0], v[1] / total) for k, v in mix.items()), key=lambda t: -t[2])

    @property
    def mean_rel_error(self) -> float | None:
        """Parameter-weighted mean relative weight error over the quantized layers."""
        rows = [r for r in self.layers if r.rel_error is not None and r.spec is not None]
        weight = sum(r.params for r in rows)
        return sum(r.rel_error * r.params for r in rows) / weight if weight else None  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        worst = max((r for r in self.layers if r.rel_error is not None), key=lambda r: r.rel_error or 0.0, default=None)
        return _clean({
            "model": self.model, "model_dir": self.model_dir, "reference": self.reference,
            "quantized": self.quantized, "subject": self.subject, "method": self.method, "plan": self.plan,
            "params": self.params, "size_bytes": self.size_bytes, "linear_bytes": self.linear_bytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "reference_size_bytes": self.reference_size_bytes,
            "reference_bits_per_weight": self.reference_bits_per_weight,
            "ppl": _round(self.ppl), "ppl_reference": _round(self.ppl_reference),
            "ppl_change": _round(self.ppl / self.ppl_reference - 1, 6) if self.ppl and self.ppl_reference else None,
            "ppl_tokens": self.ppl_tokens, "ppl_text": self.ppl_text, "seq_len": self.seq_len,
            "format_mix": [{"format": k, "layers": n, "weight_share": round(s, 4)} for k, n, s in self.format_mix],
            "mean_rel_error": _round(self.mean_rel_error, 6),
            "worst_layer": None if worst is None else {"name": worst.name, "rel_error": _round(worst.rel_error, 6)},
            "layers": [r.to_dict() for r in self.layers],
            "points": [p.to_dict() for p in self.points],
            "plan_front": [p.to_dict() for p in self.plan_front],
            "plan_uniform": [p.to_dict() for p in self.plan_uniform], "plan_error_unit": self.plan_error_unit,
            "predicted_kind": self.predicted_kind,
            "histograms": [h.to_dict() for h in self.histograms],
            "speed": [s.to_dict() for s in self.speed],
            "notes": list(self.notes), "lowbit_version": self.lowbit_version, "created": self.created,
        })


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
