"""Typed adapter configs: one dataclass per method, peft's field names, unknown keys are errors.

Every config reads and writes Hugging Face peft's ``adapter_config.json`` (``to_peft_dict`` /
``config_from_peft_dict``): the fields lowbit implements map one to one; peft's other keys are
accepted only at their neutral value (None, False, empty), and anything else is refused by name
rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from lowbit.errors import InvalidSpecError, UnsupportedModelError

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS")

# peft keys with no lowbit counterpart: fine while neutral (None / False / {} / [] / peft's default)
PEFT_NEUTRAL_KEYS: dict[str, Any] = {
    "peft_version": None, "base_model_name_or_path": None, "revision": None, "inference_mode": None,
    "auto_mapping": None, "megatron_config": None, "megatron_core": None, "layers_pattern": None,
    "layers_to_transform": None, "layer_replication": None, "loftq_config": None, "eva_config": None,
    "corda_config": None, "lora_bias": False, "use_qalora": False, "qalora_group_size": None,
    "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
    "arrow_config": None, "ensure_weight_tying": False, "kasa_config": None, "lora_ga_config": None,
    "monteclora_config": None, "use_bdlora": None, "velora_config": None, "exclude_modules": None,
    "fan_in_fan_out": None, "tokenizer_kwargs": None,
}

_REGISTRY: dict[str, type["AdapterConfig"]] = {}


@dataclass
class AdapterConfig:
    """Base of every adapter config. ``peft_type`` names the method as peft's files do."""

    peft_type: ClassVar[str] = ""
    task_type: str | None = "CAUSAL_LM"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.peft_type:
            _REGISTRY[cls.peft_type] = cls

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise InvalidSpecError(f"{type(self).__name__}.task_type must be one of {', '.join(TASK_TYPES)}; "
                                   f"got {self.task_type!r}")

    @property
    def is_prompt_learning(self) -> bool:
        """Model-level methods (prompt, prefix): no per-layer adapter, nothing to merge."""
        return False

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content peft writes for this config."""
        data = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        data["peft_type"] = self.peft_type
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "adapter config") -> "AdapterConfig":
        """Build from our own field names; unknown keys are an :class:`InvalidSpecError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidSpecError(f"{where}: unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)


# fields typed ``Any`` that hold layer names: None, a regular expression, or a list of names
NAME_FIELDS = {"target_modules": (str, list), "exclude_modules": (str, list), "feedforward_modules": (str, list),
               "modules_to_save": (list,)}
_PLAIN_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                              "dict": (dict,), "list": (list,)}


def check_field_types(config: Any) -> None:
    """Every field of a config dataclass holds its annotated plain type (``int``, ``float`` — finite —, ``bool``,
    ``str``, ``dict``, ``X | None``; a bool is no number), and name fields hold names; else InvalidSpecError."""
    owner = type(config).__name__
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in NAME_FIELDS:
            kinds = NAME_FIELDS[f.name]
            if isinstance(value, (tuple, set)) and list in kinds:
                value = list(value)
            ok = value is None or (isinstance(value, kinds) and
                                   (not isinstance(value, list) or all(isinstance(v, str) for v in value)))
            if not ok:
                raise InvalidSpecError(f"{owner}.{f.name} must be {'a regular expression or ' if str in kinds else ''}"
                                       f"a list of module names, got {_show(value)}")
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise InvalidSpecError(f"{owner}.{f.name} {_show(value)} is not a regular expression "
                                           f"({exc})") from None
            continue
        alternatives = [a.strip() for a in str(f.type).split("|")]
        if any(a not in _PLAIN_TYPES and a != "None" for a in alternatives):
            continue  # Any, ClassVar, …: the class checks these itself
        if value is None and "None" in alternatives:
            continue
        for a in alternatives:
            types = _PLAIN_TYPES.get(a, ())
            if isinstance(value, types) and (a == "bool" or not isinstance(value, bool)) \
                    and (a != "float" or finite_number(value)):
                break
        else:
            want = " or ".join("null" if a == "None" else f"a{'n' if a == 'int' else ''} {a}" for a in alternatives)
            raise InvalidSpecError(f"{owner}.{f.name} must be {want.replace('a float', 'a finite number')}, "
                                   f"got {_show(value)}")


def finite_number(value: Any) -> bool:
    """A real number (no bool) that fits a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past the float range
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from_peft_dict(data: dict[str, Any], where: str = "adapter_config.json") -> AdapterConfig:
    """Parse a peft ``adapter_config.json`` into lowbit's config for its ``peft_type``."""
    peft_type = data.get("peft_type")
    cls = _REGISTRY.get(str(peft_type))
    if cls is None:
        raise UnsupportedModelError(f"{where}: peft_type {peft_type!r} is not supported by lowbit "
                                    f"(supported: {', '.join(sorted(_REGISTRY))})")
    names = {f.name for f in dataclasses.fields(cls)}
    mine: dict[str, Any] = {}
    for key, value in data.items():
        if key == "peft_type":
            continue
        if key in names:
            mine[key] = _from_json(cls, key, value)
        elif key in PEFT_NEUTRAL_KEYS or key in getattr(cls, "peft_ignored", {}):
            neutral = getattr(cls, "peft_ignored", {}).get(key, PEFT_NEUTRAL_KEYS.get(key))
            if value not in (None, False, {}, [], neutral) and key not in _INFORMATIONAL:
                raise UnsupportedModelError(f"{where}: peft option {key}={_show(value)} is not supported by lowbit")
        else:
            raise UnsupportedModelError(f"{where}: unknown {peft_type} option {key!r} (value {_show(value)}); "
                                        "lowbit does not know how to apply it")
    try:
        return cls(**mine)
    except InvalidSpecError as exc:
        raise InvalidSpecError(f"{where}: {exc}") from None


_INFORMATIONAL = {"peft_version", "base_model_name_or_path", "revision", "inference_mode", "megatron_core",
                  "qalora_group_size", "auto_mapping", "tokenizer_kwargs"}


def registered_configs() -> dict[str, type[AdapterConfig]]:
    return dict(_REGISTRY)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, set):
        return sorted(value)
    return value


def _from_json(cls: type, key: str, value: Any) -> Any:
    conv = getattr(cls, "peft_from_json", None)
    return conv(key, value) if conv is not None else value


FLOAT32_MAX = 3.4028234663852886e38


def check_scaling(owner: str, key: str, value: Any) -> None:
    """A LoRA-style ``alpha``: the layer multiplies its output by alpha / r in float32, so alpha must fit it."""
    if finite_number(value) and abs(value) > FLOAT32_MAX:
        raise InvalidSpecError(f"{owner}.{key} {value!r} is past float32's range (±{FLOAT32_MAX:.3g}); the layer "
                               "scales its output by it")


def check_positive(owner: str, **values: Any) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise InvalidSpecError(f"{owner}.{key} must be positive, got {value!r}")
