"""Spec names: the short text form of a :class:`QuantSpec` that the planner's ``--candidates`` and the
report's ``--uniform`` read (and :meth:`QuantSpec.describe` writes)."""

from __future__ import annotations

from typing import Any

from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import QuantSpec


def parse_spec_name(name: str) -> QuantSpec:
    """The spec a :meth:`QuantSpec.describe` name stands for: ``int3-g64-asym``, ``int8-ch-sym``, ``nf4-b64``,
    ``fp8_e4m3-ch``, ``int4-g128-asym-fz`` (float zero-points), ``…-dq`` (double-quantized scales).

    Parts may be left out: int widths take ``lowbit quantize``'s defaults (groups of 128, asymmetric) except a
    bare ``int8``, which is per channel and symmetric (what int8 weight-only means elsewhere); nf4/fp4 blocks of
    64; fp8 per channel.
    """
    text = name.strip().lower()
    parts = text.split("-")
    head, rest = parts[0], parts[1:]
    kwargs: dict[str, Any] = {}
    if head.startswith("int") and head[3:].isdigit():
        bits = int(head[3:])
        if bits == 8 and not rest:
            return QuantSpec(format="int", bits=8, symmetric=True, granularity="channel", group_size=None)
        kwargs.update(format="int", bits=bits, symmetric=False, group_size=128, granularity="group")
    elif head in ("nf4", "fp4"):
        kwargs.update(format=head, granularity="group", group_size=64)
    elif head in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        kwargs.update(format=head, granularity="channel", group_size=None, scale_dtype="float32")
    elif head in ("fp16", "bf16") and not rest:
        return QuantSpec(format=head)
    else:
        raise InvalidSpecError(f"candidate {name!r}: unknown format {head!r}; write e.g. int3-g64-asym, int8-ch-sym, "
                               "nf4-b64, fp8_e4m3-ch")
    for part in rest:
        if part in ("ch", "t"):
            kwargs.update(granularity="channel" if part == "ch" else "tensor", group_size=None)
        elif part[:1] in ("g", "b") and part[1:].isdigit():
            kwargs.update(granularity="group", group_size=int(part[1:]))
        elif part in ("sym", "asym") and kwargs["format"] == "int":
            kwargs["symmetric"] = part == "sym"
        elif part == "fz" and kwargs["format"] == "int":
            kwargs["zero_dtype"] = "float16"
        elif part == "dq":
            kwargs["double_quant"] = True
        else:
            raise InvalidSpecError(f"candidate {name!r}: cannot read {part!r} "
                                   "(expected gN/bN, ch, t, sym, asym, fz, dq)")
    return QuantSpec(**kwargs)
