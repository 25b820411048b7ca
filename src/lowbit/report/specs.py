"""Short spec names for the report's uniform formats: ``int8``, ``int4-g128``, ``int3-g64-sym``, ``nf4``, ``fp8`` …

Names are read by :func:`lowbit.formats.names.parse_spec_name` (the planner's ``--candidates`` read them
the same way): ``int8`` is per channel symmetric, other int widths groups of 128 asymmetric.
"""

from __future__ import annotations

from lowbit.errors import InvalidSpecError
from lowbit.formats.names import parse_spec_name
from lowbit.formats.spec import QuantSpec

DEFAULT_UNIFORM = ("int8", "int4-g128", "int3-g128", "nf4")
__all__ = ["DEFAULT_UNIFORM", "parse_spec_list", "parse_spec_name", "short_name"]


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
