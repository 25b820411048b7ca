"""Short spec names for the report's uniform formats: ``int8``, ``int4-g128``, ``int3-g64-sym``, ``nf4``, ``fp8`` …

Grammar (the names :meth:`QuantSpec.describe` prints read back, plus shorthands):
``int<bits>[-g<N>|-ch|-t][-sym|-asym]`` (default: int8 per channel symmetric, other widths
group 128 asymmetric, like ``lowbit quantize``), ``nf4|fp4[-b<N>][-dq]`` (block 64),
``fp8[_e4m3|_e5m2]`` (per channel).
"""

from __future__ import annotations

import re

from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import QuantSpec

DEFAULT_UNIFORM = ("int8", "int4-g128", "int3-g128", "nf4")

_INT = re.compile(r"int(\d+)(?:-(g\d+|ch|t))?(?:-(sym|asym))?")
_CODEBOOK = re.compile(r"(nf4|fp4)(?:-b(\d+))?(-dq)?")
_FP8 = re.compile(r"fp8(?:_(e4m3|e5m2))?(?:-(ch|g\d+))?")


def parse_spec_name(name: str) -> QuantSpec:
    """The :class:`QuantSpec` a short name stands for (see the module docstring)."""
    text = name.strip().lower()
    if m := _INT.fullmatch(text):
        bits = int(m.group(1))
        gran = m.group(2) or ("ch" if bits == 8 else "g128")
        symmetric = m.group(3) == "sym" if m.group(3) else bits == 8
        group = {"ch": None, "t": -1}.get(gran)
        if group is None and gran.startswith("g"):
            group = int(gran[1:])
        return QuantSpec.int_(bits, group, symmetric=symmetric)
    if m := _CODEBOOK.fullmatch(text):
        block = int(m.group(2) or 64)
        return (QuantSpec.nf4 if m.group(1) == "nf4" else QuantSpec.fp4)(block, double_quant=bool(m.group(3)))
    if m := _FP8.fullmatch(text):
        group = int(m.group(2)[1:]) if m.group(2) and m.group(2).startswith("g") else None
        return QuantSpec.fp8(m.group(1) or "e4m3", group)
    raise InvalidSpecError(f"unknown format name {name!r}; expected e.g. int8, int4-g128, int3-g64-sym, nf4, "
                           "nf4-b64-dq, fp4, fp8")


def parse_spec_list(text: str) -> list[QuantSpec]:
    """Comma-separated names → specs (duplicates dropped, order kept)."""
    specs: list[QuantSpec] = []
    for item in text.split(","):
        if item.strip():
            spec = parse_spec_name(item)
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise InvalidSpecError("--uniform: no format names given (e.g. --uniform int8,int4-g128,nf4)")
    return specs


def short_name(spec: QuantSpec) -> str:
    """A compact label for plots: ``int4-g128`` for the default asymmetric int4, ``int8`` for int8-ch-sym …"""
    name = spec.describe()
    for long, short in (("int8-ch-sym", "int8"), ("nf4-b64", "nf4"), ("fp4-b64", "fp4"), ("fp8_e4m3-ch", "fp8")):
        if name.startswith(long):
            return short + name[len(long):]
    if spec.format == "int" and not spec.symmetric and spec.bits != 8 and not spec.double_quant:
        return name.removesuffix("-asym")
    return name
