"""The versioned ``quantization_config`` block lowbit writes into config.json."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lowbit.errors import CorruptFileError
from lowbit.formats.act import ActSpec
from lowbit.formats.spec import QuantSpec

QUANT_METHOD = "lowbit"
FORMAT_VERSION = 1


def make_quantization_config(layer_specs: dict[str, QuantSpec], method: str, extra: dict[str, Any] | None = None,
                             act_specs: dict[str, ActSpec] | None = None) -> dict[str, Any]:
    """``{"quant_method": "lowbit", "format_version": 1, "default_spec": …, "modules": {name: "default" | spec}}``.

    The most common spec is written once as ``default_spec``; every quantized module is listed.
    Modules that also quantize their input activations are listed with their :class:`ActSpec` under
    ``"activations": {name: act_spec}`` (written only when there is one).
    """
    from lowbit import __version__

    counts = Counter(layer_specs.values())
    default = counts.most_common(1)[0][0] if counts else None
    modules: dict[str, Any] = {name: ("default" if spec == default else spec.to_dict()) for name, spec in layer_specs.items()}
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "method": method,
        "default_spec": None if default is None else default.to_dict(),
        "modules": modules,
    }
    if act_specs:
        config["activations"] = {name: spec.to_dict() for name, spec in act_specs.items()}
    config.update(extra or {})
    return config


def parse_quantization_config(qcfg: dict[str, Any], where: str) -> tuple[dict[str, QuantSpec], str]:
    """{module name: spec} and method from a config.json ``quantization_config``."""
    version = qcfg.get("format_version")
    if not isinstance(version, int):
        raise CorruptFileError(f"{where}: quantization_config has no integer 'format_version'")
    if version > FORMAT_VERSION:
        raise CorruptFileError(f"{where}: quantization_config format_version {version} is newer than this lowbit "
                               f"understands ({FORMAT_VERSION}); upgrade lowbit")
    modules = qcfg.get("modules")
    if not isinstance(modules, dict):
        raise CorruptFileError(f"{where}: quantization_config has no 'modules' object")
    default = qcfg.get("default_spec")
    default_spec = None if default is None else QuantSpec.from_dict(default, f"{where}: quantization_config.default_spec")
    specs = {}
    for name, value in modules.items():
        if value == "default":
            if default_spec is None:
                raise CorruptFileError(f"{where}: module {name} uses 'default' but default_spec is missing")
            specs[name] = default_spec
        else:
            specs[name] = QuantSpec.from_dict(value, f"{where}: quantization_config.modules[{name!r}]")
    return specs, str(qcfg.get("method", "rtn"))


def parse_activation_config(qcfg: dict[str, Any], where: str, layer_specs: dict[str, QuantSpec]) -> dict[str, ActSpec]:
    """{module name: act spec} from a ``quantization_config`` (empty for files without ``activations``)."""
    activations = qcfg.get("activations")
    if activations is None:
        return {}
    if not isinstance(activations, dict):
        raise CorruptFileError(f"{where}: quantization_config.activations must be an object")
    specs = {}
    for name, value in activations.items():
        if name not in layer_specs:
            raise CorruptFileError(f"{where}: quantization_config.activations names {name!r}, which is not a "
                                   "quantized module")
        specs[name] = ActSpec.from_dict(value, f"{where}: quantization_config.activations[{name!r}]")
    return specs
