"""Read what ``lowbit plan`` writes, tolerantly: the recipe, its Pareto front and the per-layer measurement.

``--plan RECIPE.yaml`` names the recipe; beside it the report looks for ``RECIPE.pareto.json`` and a
measurement JSON (``RECIPE.measure.json``, ``RECIPE.measurements.json``, ``RECIPE.layers.json``,
``measurements.json`` or ``measure.json``; or name it with ``--measurements``).

Accepted shapes (keys are matched case-insensitively among the listed synonyms):

* Pareto front: what ``lowbit plan`` writes (``{"format": "lowbit-plan-pareto", "front": [...],
  "plan": {chosen point}, "uniform": [...], "predicted_error_unit": …}``), or generally a list of
  points, or an object holding one under ``points``/``front``/``pareto`` (optionally with
  ``chosen``/``selected``/``plan``: a point or an index). A point has a size
  (``bits_per_weight``/``bpw``/``bits`` or ``size_bytes``/``bytes``), a quality (``ppl``/
  ``perplexity``/``predicted_ppl``, else ``error``/``predicted_error``/``output_error``/``loss``/
  ``kl``/``cost``), optionally ``label``/``name`` and ``chosen: true``.
* Measurement: what ``lowbit plan`` writes (``{"format": "lowbit-plan-measure", "candidates":
  [{"name": …}], "layers": [{"name": …, "rel_error": [one per candidate]}]}``: the layer's relative
  output error on its calibration inputs), or ``{"layers": {layer: {spec name: error | {"error": …}}}}``
  (or that mapping at the top level), or a list of ``{"layer": …, "spec": …, "error": …}`` rows. The
  error at the layer's own spec is what the report plots as the planner's prediction.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import CorruptFileError, InvalidSpecError, ModelNotFoundError
from lowbit.recipe import QuantRecipe

_BITS_KEYS = ("bits_per_weight", "bpw", "bits", "avg_bits", "mean_bits")
_BYTES_KEYS = ("size_bytes", "bytes", "linear_bytes", "total_bytes")
_PPL_KEYS = ("ppl", "perplexity", "predicted_ppl", "measured_ppl")
_ERR_KEYS = ("error", "predicted_error", "output_error", "loss", "kl", "cost", "err", "objective")
_LABEL_KEYS = ("label", "name", "id")
_POINT_LISTS = ("points", "front", "pareto", "pareto_front", "plans", "candidates")
PLAN_MEASURE_FORMAT = "lowbit-plan-measure"
_MEASURE_NAMES = ("{stem}.measure.json", "{stem}.measurements.json", "{stem}.layers.json",
                  "{stem}.measurement.json", "measurements.json", "measure.json", "measurement.json")


@dataclass
class PlanPoint:
    """One plan on the planner's front: size (bits/weight and/or bytes) and predicted quality."""

    bits_per_weight: float | None
    size_bytes: float | None
    ppl: float | None
    error: float | None
    label: str = ""
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"bits_per_weight": self.bits_per_weight, "size_bytes": self.size_bytes, "ppl": self.ppl,
                "error": self.error, "label": self.label, "chosen": self.chosen}


@dataclass
class PlanFiles:
    recipe: QuantRecipe | None = None
    recipe_path: Path | None = None
    front: list[PlanPoint] = field(default_factory=list)
    front_path: Path | None = None
    uniform: list[PlanPoint] = field(default_factory=list)  # the planner's predictions for uniform candidates
    error_unit: str | None = None                           # what the front's errors measure
    measurement: dict[str, dict[str, float]] = field(default_factory=dict)  # layer → {spec name: error}
    chosen: dict[str, str] = field(default_factory=dict)  # layer → spec name the measurement marks chosen
    measurement_path: Path | None = None
    measurement_kind: str = "predicted error"  # what the measurement's numbers are

    def predicted_error(self, layer: str, spec_names: tuple[str, ...]) -> float | None:
        """The measured error of ``layer`` at the first of ``spec_names`` the measurement has (or its chosen one)."""
        table = self.measurement.get(layer)
        if not table:
            return None
        lowered = {k.lower(): v for k, v in table.items()}
        for name in spec_names:
            if name.lower() in lowered:
                return lowered[name.lower()]
        chosen = self.chosen.get(layer)
        return table.get(chosen) if chosen else None


def read_plan(plan: str | Path | None, measurements: str | Path | None = None) -> PlanFiles:
    """The recipe at ``plan`` and the planner outputs found beside it (each part optional)."""
    files = PlanFiles()
    if plan is not None:
        path = Path(plan)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: plan recipe not found")
        files.recipe, files.recipe_path = QuantRecipe.load(path), path
        stem = path.name.rsplit(".", 1)[0]
        pareto = path.with_name(f"{stem}.pareto.json")
        if pareto.is_file():
            files.front, files.front_path = read_front(pareto), pareto
            files.uniform, files.error_unit = read_front_extras(pareto)
        if measurements is None:
            measurements = next((path.with_name(n.format(stem=stem)) for n in _MEASURE_NAMES
                                 if path.with_name(n.format(stem=stem)).is_file()), None)
    if measurements is not None:
        mpath = Path(measurements)
        if not mpath.is_file():
            raise ModelNotFoundError(f"{mpath}: measurement JSON not found")
        files.measurement, files.chosen = read_measurement(mpath)
        files.measurement_path = mpath
        if _is_plan_measurement(mpath):
            files.measurement_kind = "relative output error ‖ΔW·x‖² / ‖W·x‖² on calibration inputs"
    return files


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path}: cannot read JSON ({exc})") from None


def _number(data: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    lowered = {str(k).lower(): v for k, v in data.items()}
    for key in keys:
        value = lowered.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def read_front(path: Path) -> list[PlanPoint]:
    data = _load_json(path)
    chosen_ref: Any = None
    if isinstance(data, dict):
        chosen_ref = next((data[k] for k in ("chosen", "selected", "plan") if k in data), None)
        items = next((data[k] for k in _POINT_LISTS if isinstance(data.get(k), list)), None)
        if items is None:
            raise CorruptFileError(f"{path}: expected a list of points or an object with one of "
                                   f"{', '.join(_POINT_LISTS)}")
    elif isinstance(data, list):
        items = data
    else:
        raise CorruptFileError(f"{path}: expected a JSON list or object")
    points = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CorruptFileError(f"{path}: point {i} is not an object")
        label = next((str(item[k]) for k in _LABEL_KEYS if isinstance(item.get(k), (str, int))), "")
        point = PlanPoint(_number(item, _BITS_KEYS), _number(item, _BYTES_KEYS), _number(item, _PPL_KEYS),
                          _number(item, _ERR_KEYS), label, bool(item.get("chosen") or item.get("selected")))
        if point.bits_per_weight is None and point.size_bytes is None:
            raise CorruptFileError(f"{path}: point {i} has no size (one of {', '.join(_BITS_KEYS + _BYTES_KEYS)})")
        points.append(point)
    if isinstance(chosen_ref, int) and not isinstance(chosen_ref, bool) and 0 <= chosen_ref < len(points):
        points[chosen_ref].chosen = True
    elif isinstance(chosen_ref, dict):
        bits, err = _number(chosen_ref, _BITS_KEYS), _number(chosen_ref, _PPL_KEYS + _ERR_KEYS)
        match = [p for p in points if p.bits_per_weight == bits and (p.ppl == err or p.error == err)]
        if match:
            match[0].chosen = True
        else:
            label = next((str(chosen_ref[k]) for k in _LABEL_KEYS if k in chosen_ref), "chosen")
            points.append(PlanPoint(bits, _number(chosen_ref, _BYTES_KEYS), _number(chosen_ref, _PPL_KEYS),
                                    _number(chosen_ref, _ERR_KEYS), label, True))
    return points


def read_front_extras(path: Path) -> tuple[list[PlanPoint], str | None]:
    """The planner's uniform-candidate points and its error unit, when the Pareto file has them."""
    data = _load_json(path)
    if not isinstance(data, dict):
        return [], None
    unit = data.get("predicted_error_unit")
    points = []
    for item in data.get("uniform") or []:
        if isinstance(item, dict):
            label = str(item.get("candidate", item.get("label", "")))
            point = PlanPoint(_number(item, _BITS_KEYS), _number(item, _BYTES_KEYS), _number(item, _PPL_KEYS),
                              _number(item, _ERR_KEYS), label)
            if point.bits_per_weight is not None:
                points.append(point)
    return points, unit if isinstance(unit, str) else None


def read_measurement(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """{layer: {spec name: error}} and {layer: chosen spec name} from a measurement JSON."""
    data = _load_json(path)
    table: dict[str, dict[str, float]] = {}
    chosen: dict[str, str] = {}
    if isinstance(data, dict) and data.get("format") == PLAN_MEASURE_FORMAT:
        return _read_plan_measurement(data, path), chosen
    if isinstance(data, dict):
        rows = data.get("layers", data.get("measurements", data))
    else:
        rows = data
    if isinstance(rows, list):
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("layer", row.get("name")), str):
                raise CorruptFileError(f"{path}: row {i} needs a 'layer' name")
            layer = str(row.get("layer", row.get("name")))
            spec = row.get("spec", row.get("format", row.get("candidate")))
            err = _number(row, _ERR_KEYS)
            if isinstance(spec, dict):
                spec = _spec_label(spec, f"{path}: row {i}")
            if isinstance(spec, str) and err is not None:
                table.setdefault(layer, {})[spec] = err
                if row.get("chosen"):
                    chosen[layer] = spec
        return table, chosen
    if not isinstance(rows, dict):
        raise CorruptFileError(f"{path}: expected per-layer measurements (an object or a list)")
    for layer, entry in rows.items():
        if not isinstance(entry, dict):
            continue
        candidates = entry.get("candidates", entry.get("specs", entry.get("errors", entry)))
        if isinstance(candidates, list):
            for item in candidates:
                if isinstance(item, dict):
                    spec = item.get("spec", item.get("name"))
                    spec = _spec_label(spec, str(path)) if isinstance(spec, dict) else spec
                    err = _number(item, _ERR_KEYS)
                    if isinstance(spec, str) and err is not None:
                        table.setdefault(str(layer), {})[spec] = err
        elif isinstance(candidates, dict):
            for spec, value in candidates.items():
                err = value if isinstance(value, (int, float)) and not isinstance(value, bool) else (
                    _number(value, _ERR_KEYS) if isinstance(value, dict) else None)
                if err is not None and math.isfinite(err) and spec not in ("chosen", "params", "numel"):
                    table.setdefault(str(layer), {})[str(spec)] = float(err)
        pick = entry.get("chosen")
        if isinstance(pick, str):
            chosen[str(layer)] = pick
    return table, chosen


def _is_plan_measurement(path: Path) -> bool:
    data = _load_json(path)
    return isinstance(data, dict) and data.get("format") == PLAN_MEASURE_FORMAT


def _read_plan_measurement(data: dict[str, Any], path: Path) -> dict[str, dict[str, float]]:
    """``lowbit plan``'s measurement: each layer's relative output error at each candidate."""
    candidates = data.get("candidates")
    layers = data.get("layers")
    if not isinstance(candidates, list) or not isinstance(layers, list):
        raise CorruptFileError(f"{path}: a {PLAN_MEASURE_FORMAT} file needs 'candidates' and 'layers' lists")
    names = [str(c.get("name")) if isinstance(c, dict) else str(c) for c in candidates]
    table: dict[str, dict[str, float]] = {}
    for i, layer in enumerate(layers):
        errors = layer.get("rel_error") if isinstance(layer, dict) else None
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str) or not isinstance(errors, list) \
                or len(errors) != len(names):
            raise CorruptFileError(f"{path}: layers[{i}] needs a name and one rel_error per candidate")
        table[layer["name"]] = {n: float(e) for n, e in zip(names, errors)
                                if isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)}
    return table


def _spec_label(spec: dict[str, Any], where: str) -> str:
    from lowbit.formats.spec import QuantSpec

    try:
        return QuantSpec.from_dict(spec, where).describe()
    except InvalidSpecError:
        return json.dumps(spec, sort_keys=True)
