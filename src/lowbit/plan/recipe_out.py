"""Plan → recipe: the most common choice becomes the default spec, every other layer an exact-name override.

The recipe is what ``lowbit quantize MODEL --recipe RECIPE.yaml`` applies; :func:`plan_recipe`
checks that it gives every planned layer exactly its planned spec (and quantizes no other layer).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import QuantSpec
from lowbit.recipe import DEFAULT_SKIP, LayerOverride, QuantRecipe, name_matches


def plan_recipe(layer_specs: dict[str, QuantSpec], method: str, options: dict[str, Any] | None = None,
                candidates: list[QuantSpec] | None = None, skip: tuple[str, ...] = DEFAULT_SKIP,
                tied_head: str = "untie") -> QuantRecipe:
    """A recipe giving each layer (in ``layer_specs``' order) its spec.

    The default is the spec most layers use (ties: the earlier candidate); the others — and planned
    layers a skip pattern names (the output head) — are overrides whose pattern is the layer's full name.
    ``tied_head="share"``: a planned output head tied to the input embedding stays shared with it.
    """
    counts = Counter(layer_specs.values())
    order = {spec: i for i, spec in enumerate(candidates or [])}
    default = min(counts, key=lambda s: (-counts[s], order.get(s, len(order)), s.describe()))
    overrides = tuple(LayerOverride(name, spec) for name, spec in layer_specs.items()
                      if spec != default or any(name_matches(p, name) for p in skip))
    recipe = QuantRecipe(default=default, method=method, skip=skip, overrides=overrides,
                         options=tuple(sorted((options or {}).items())), tied_head=tied_head)
    for name, spec in layer_specs.items():
        if recipe.spec_for(name) != spec:
            raise InvalidSpecError(f"{name}: the recipe would give {recipe.spec_for(name)}, the plan says "
                                   f"{spec.describe()} (a skip pattern matches this layer?)")
    return recipe


def check_recipe_targets(model: Any, recipe: QuantRecipe, layer_specs: dict[str, QuantSpec]) -> None:
    """The recipe quantizes exactly the planned layers of ``model``, each with its planned spec."""
    from lowbit.models.targets import select_targets

    targets = select_targets(model, recipe)
    if targets != layer_specs:
        extra = sorted(set(targets) - set(layer_specs))
        wrong = sorted(n for n in set(targets) & set(layer_specs) if targets[n] != layer_specs[n])
        raise InvalidSpecError(f"the recipe does not reproduce the plan: extra layers {extra[:5]}, "
                               f"missing {sorted(set(layer_specs) - set(targets))[:5]}, different specs {wrong[:5]}")


def compact_spec(spec: QuantSpec) -> dict[str, Any]:
    """The spec's fields that differ from QuantSpec's defaults (``format`` always): what a reader needs."""
    default = QuantSpec().to_dict()
    return {k: v for k, v in spec.to_dict().items() if k == "format" or v != default[k]}


def recipe_text(recipe: QuantRecipe, path: Path, header: list[str]) -> str:
    """The recipe as YAML (``.yaml``/``.yml``, with ``header`` as comment lines) or JSON; specs written compactly."""
    import json

    data = recipe.to_dict()
    data["default"] = compact_spec(recipe.default)
    data["overrides"] = [{"pattern": o.pattern, "spec": None if o.spec is None else compact_spec(o.spec)}
                         for o in recipe.overrides]
    if path.suffix in (".yaml", ".yml"):
        import yaml

        comments = "".join(f"# {line}\n" for line in header)
        return comments + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    return json.dumps(data, indent=1) + "\n"


def write_recipe(recipe: QuantRecipe, path: str | Path, header: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the recipe atomically and check it reads back as the same recipe before it replaces ``path``."""
    from lowbit.plan.measure import write_text_atomic

    path = Path(path)

    def check(tmp: Path) -> None:
        if QuantRecipe.load(tmp) != recipe:
            raise InvalidSpecError(f"{path}: the written recipe does not read back as the planned one")

    write_text_atomic(path, recipe_text(recipe, path, list(header)), check)
    return path


def sibling(path: str | Path, suffix: str) -> Path:
    """``plan.yaml`` + ``.pareto.json`` → ``plan.pareto.json``."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml", ".json") else path.name
    return path.with_name(stem + suffix)


# ---- GGUF plans: per-tensor block types for ``lowbit export --format gguf --plan`` -------------------
GGUF_PLAN_FORMAT = "lowbit-gguf-plan"


def write_gguf_plan(types: dict[str, str], path: str | Path, header: list[str] | tuple[str, ...] = (),
                    model: str | None = None) -> Path:
    """Write ``{module name: GGUF block type}`` as a plan file (YAML or JSON, atomically; checked on read-back)."""
    import json

    from lowbit.plan.measure import write_text_atomic

    path = Path(path)
    data = {"format": GGUF_PLAN_FORMAT, "version": 1, "model": model, "tensor_types": dict(types)}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(data, sort_keys=False, width=120)
    else:
        text = json.dumps(data, indent=1) + "\n"

    def check(tmp: Path) -> None:
        if read_gguf_plan(tmp) != types:
            raise InvalidSpecError(f"{path}: the written plan does not read back as the planned one")

    write_text_atomic(path, text, check)
    return path


def read_gguf_plan(path: str | Path) -> dict[str, str]:
    """{module name: GGUF block type (lower case)} from a plan file written by :func:`write_gguf_plan`."""
    from lowbit.io.structured import load_json_or_yaml
    from lowbit.plan.measure import GGUF_CANDIDATES

    path = Path(path)
    data = load_json_or_yaml(path, "the GGUF plan")
    if not isinstance(data, dict) or data.get("format") != GGUF_PLAN_FORMAT:
        hint = " (a lowbit recipe: apply it with lowbit quantize --recipe)" if isinstance(data, dict) and \
            "default" in data else ""
        raise InvalidSpecError(f"{path}: not a GGUF plan (format != {GGUF_PLAN_FORMAT!r}){hint}")
    types = data.get("tensor_types")
    if not isinstance(types, dict) or not types:
        raise InvalidSpecError(f"{path}: tensor_types must be a non-empty mapping of module name → GGUF type")
    out = {}
    for name, qtype in types.items():
        if not isinstance(qtype, str) or qtype.lower() not in GGUF_CANDIDATES:
            raise InvalidSpecError(f"{path}: tensor_types[{name!r}] = {qtype!r} is not a GGUF block type "
                                   f"({', '.join(GGUF_CANDIDATES)})")
        out[str(name)] = qtype.lower()
    return out
