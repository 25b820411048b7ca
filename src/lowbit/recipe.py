"""Declarative quantization recipe: a default spec, name patterns to skip/include, per-layer overrides.

Patterns match a module's dotted name when the pattern equals the name, equals a trailing part of
it (``q_proj`` matches ``model.layers.0.self_attn.q_proj``), or matches it entirely as a regular
expression (``model\\.layers\\.[0-3]\\..*``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import QuantSpec

METHODS = ("rtn", "hqq", "gptq", "awq", "static", "smoothquant", "llm-int8")
STREAMING_METHODS = ("rtn", "hqq")           # calibration-free, tensor by tensor from the shards
LAYERWISE_METHODS = ("gptq", "awq")          # block-by-block runner (blocks can be read lazily)
ACTIVATION_METHODS = ("static", "smoothquant", "llm-int8")  # activations quantized too
DEFAULT_SKIP = ("lm_head",)
TIED_HEAD_MODES = ("untie", "share")  # a quantized head tied to the input embedding: float embedding kept, or shared


def name_matches(pattern: str, name: str) -> bool:
    if pattern == name or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


@dataclass(frozen=True)
class LayerOverride:
    """Layers matching ``pattern`` use ``spec`` instead of the default (``None``: keep them float)."""

    pattern: str
    spec: QuantSpec | None


@dataclass(frozen=True)
class QuantRecipe:
    default: QuantSpec
    method: str = "rtn"
    skip: tuple[str, ...] = DEFAULT_SKIP
    include: tuple[str, ...] | None = None
    overrides: tuple[LayerOverride, ...] = field(default_factory=tuple)
    options: tuple[tuple[str, Any], ...] = ()  # method options, e.g. (("act_order", True), ("damp", 0.01))
    # When an override quantizes an output head tied to the input embedding: "untie" keeps the embedding
    # float beside the quantized head; "share" makes the embedding read its rows from the quantized head
    # (one quantized matrix, as llama.cpp stores a tied token_embd) — see lowbit.nn.SharedQuantEmbedding.
    tied_head: str = "untie"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidSpecError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        if self.tied_head not in TIED_HEAD_MODES:
            raise InvalidSpecError(f"tied_head {self.tied_head!r}: choose one of {', '.join(TIED_HEAD_MODES)}")
        if isinstance(self.options, dict):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))
        for pattern in (*self.skip, *(self.include or ()), *(o.pattern for o in self.overrides)):
            if not isinstance(pattern, str):
                raise InvalidSpecError(f"layer pattern {pattern!r}: expected a string (a layer name or a regular "
                                       "expression)")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InvalidSpecError(f"invalid layer pattern {pattern!r}: {exc}") from None

    def override_for(self, name: str) -> LayerOverride | None:
        """The first override whose pattern matches layer ``name``, if any."""
        return next((o for o in self.overrides if name_matches(o.pattern, name)), None)

    def spec_for(self, name: str) -> QuantSpec | None:
        """The spec layer ``name`` is quantized with, or None to leave it in float."""
        for override in self.overrides:
            if name_matches(override.pattern, name):
                return override.spec
        if any(name_matches(p, name) for p in self.skip):
            return None
        if self.include is not None and not any(name_matches(p, name) for p in self.include):
            return None
        return self.default

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "default": self.default.to_dict(),
            "skip": list(self.skip),
            "include": None if self.include is None else list(self.include),
            "overrides": [{"pattern": o.pattern, "spec": None if o.spec is None else o.spec.to_dict()}
                          for o in self.overrides],
            "options": dict(self.options),
            **({"tied_head": self.tied_head} if self.tied_head != "untie" else {}),
        }

    @property
    def streams(self) -> bool:
        return self.method in STREAMING_METHODS

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "QuantRecipe":
        allowed = {"method", "default", "skip", "include", "overrides", "options", "tied_head"}
        if not isinstance(data, dict):
            raise InvalidSpecError(f"{where}: expected an object")
        unknown = sorted(set(data) - allowed, key=str)
        if unknown:
            raise InvalidSpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "default" not in data:
            raise InvalidSpecError(f"{where}: missing 'default' spec")
        raw_overrides = data.get("overrides") or []
        if not isinstance(raw_overrides, list):
            raise InvalidSpecError(f"{where}: overrides must be a list of {{'pattern': str, 'spec': spec or null}}")
        overrides = []
        for i, item in enumerate(raw_overrides):
            pattern = item.get("pattern") if isinstance(item, dict) else None
            if not isinstance(pattern, str) or set(item) - {"pattern", "spec"}:
                raise InvalidSpecError(f"{where}: overrides[{i}] must be {{'pattern': str, 'spec': spec or null}}")
            spec = item.get("spec")
            overrides.append(LayerOverride(item["pattern"],
                                           None if spec is None else QuantSpec.from_dict(spec, f"{where}: overrides[{i}].spec")))
        include = data.get("include")
        options = data.get("options") or {}
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise InvalidSpecError(f"{where}: options must be an object {{name: value}}, got {_show(options)}")
        for key in ("method", "tied_head"):
            if not isinstance(data.get(key, ""), str):
                raise InvalidSpecError(f"{where}: {key} must be a string, got {_show(data[key])}")
        from lowbit.algorithms.weight_only import method_config

        try:
            recipe = cls(
                default=QuantSpec.from_dict(data["default"], f"{where}: default"),
                method=data.get("method", "rtn"),
                skip=_patterns(data.get("skip", DEFAULT_SKIP), "skip", where),
                include=None if include is None else _patterns(include, "include", where),
                overrides=tuple(overrides),
                options=tuple(sorted(options.items())),
                tied_head=data.get("tied_head", "untie"),
            )
            method_config(recipe)  # the method's options are checked when the recipe is read
        except InvalidSpecError as exc:
            text = str(exc)
            raise InvalidSpecError(text if text.startswith(f"{where}: ") else f"{where}: {text}") from None
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> "QuantRecipe":
        """Read a recipe from a JSON or YAML file."""
        from lowbit.io.structured import load_json_or_yaml

        data = load_json_or_yaml(path, "recipe")
        return cls.from_dict(data, str(path))


def _patterns(value: Any, key: str, where: str) -> tuple[str, ...]:
    """A recipe's ``skip``/``include``: a list of layer patterns (one string counts as a list of one)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise InvalidSpecError(f"{where}: {key} must be a list of layer names or regular expressions, "
                               f"got {_show(value)}")
    return tuple(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_recipe(spec_or_recipe: QuantSpec | QuantRecipe | dict[str, Any]) -> QuantRecipe:
    if isinstance(spec_or_recipe, QuantRecipe):
        return spec_or_recipe
    if isinstance(spec_or_recipe, QuantSpec):
        return QuantRecipe(default=spec_or_recipe)
    if isinstance(spec_or_recipe, dict):
        return QuantRecipe.from_dict(spec_or_recipe)
    raise InvalidSpecError(f"expected a QuantSpec, QuantRecipe or dict, got {type(spec_or_recipe).__name__}")
