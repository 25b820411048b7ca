"""QuantSpec: one serialisable description of how a weight is stored.

A spec answers *what* the stored numbers are (format, bits, granularity, scale layout); the
algorithms (RTN, GPTQ, AWQ, …) only decide *which* values go into that format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from lowbit.errors import InvalidSpecError

FORMATS = ("int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16")
FORMAT_ALIASES = {"fp8": "fp8_e4m3", "float16": "fp16", "bfloat16": "bf16", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"}
GRANULARITIES = ("tensor", "channel", "group")
INT_BITS = (2, 3, 4, 5, 6, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")
ZERO_DTYPES = ("int", "float16", "bfloat16", "float32")
DOUBLE_QUANT_BLOCK = 256  # block size of the 8-bit second-level quantization of the scales (as in QLoRA)

_FIXED_BITS = {"nf4": 4, "fp4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8, "fp16": 16, "bf16": 16}


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized and stored.

    Attributes:
        format: ``int`` (linear/affine integers), ``nf4``/``fp4`` (4-bit codebooks scaled by the
            block absmax), ``fp8_e4m3``/``fp8_e5m2`` (scaled float8), ``fp16``/``bf16`` (plain casts).
        bits: integer width for ``int`` (2, 3, 4, 5, 6 or 8); fixed by the format otherwise.
        symmetric: ``int`` only. True: zero-point 0, ``q = round(x/S)``. False: ``q = round(x/S + Z)``.
        granularity: one scale per ``tensor``, per output ``channel`` (row) or per ``group`` of
            ``group_size`` consecutive input columns of a row.
        group_size: columns per group (``granularity='group'``); must divide the input dimension.
        double_quant: quantize the per-group scales themselves to 8 bits in blocks of 256 (QLoRA).
        scale_dtype: dtype the (first-level) scales are stored in when not double-quantized.
        zero_dtype: asymmetric int only: ``int`` stores b-bit integer zero-points (packed); a float
            dtype stores real-valued zero-points (what HQQ's optimiser produces).
    """

    format: str = "int"
    bits: int = 4
    symmetric: bool = True
    granularity: str = "group"
    group_size: int | None = 128
    double_quant: bool = False
    scale_dtype: str = "float16"
    zero_dtype: str = "int"

    def __post_init__(self) -> None:
        fmt = FORMAT_ALIASES.get(self.format, self.format)
        if fmt not in FORMATS:
            raise InvalidSpecError(f"unknown format {self.format!r}; expected one of {', '.join(FORMATS)} (or fp8)")
        object.__setattr__(self, "format", fmt)
        if fmt == "int":
            if not isinstance(self.bits, int) or self.bits not in INT_BITS:
                raise InvalidSpecError(f"bits={self.bits!r} is out of range for int format; expected one of {INT_BITS}")
        else:
            want = _FIXED_BITS[fmt]
            if self.bits not in (want, None) and self.bits != 4:  # 4 is the dataclass default
                raise InvalidSpecError(f"format {fmt} has {want} bits; got bits={self.bits}")
            object.__setattr__(self, "bits", want)
            object.__setattr__(self, "symmetric", True)
        if fmt in ("fp16", "bf16"):
            object.__setattr__(self, "granularity", "tensor")
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "double_quant", False)
        if self.granularity not in GRANULARITIES:
            raise InvalidSpecError(f"unknown granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise InvalidSpecError(f"granularity 'group' needs a positive integer group_size, got {self.group_size!r}")
        else:
            object.__setattr__(self, "group_size", None)
        if self.scale_dtype not in SCALE_DTYPES:
            raise InvalidSpecError(f"unknown scale_dtype {self.scale_dtype!r}; expected one of {SCALE_DTYPES}")
        if self.zero_dtype not in ZERO_DTYPES:
            raise InvalidSpecError(f"unknown zero_dtype {self.zero_dtype!r}; expected one of {ZERO_DTYPES}")
        if fmt != "int" or self.symmetric:
            object.__setattr__(self, "zero_dtype", "int")
        if self.double_quant and self.granularity == "tensor":
            raise InvalidSpecError("double_quant needs per-channel or per-group scales, not per-tensor")

    # ---- constructors for the common schemes -------------------------------------------------
    @classmethod
    def int_(cls, bits: int = 4, group_size: int | None = 128, symmetric: bool = True, **kw: Any) -> "QuantSpec":
        """Integer spec; ``group_size=None`` means per-channel, ``group_size=-1`` per-tensor."""
        if group_size is None:
            return cls("int", bits, symmetric, "channel", None, **kw)
        if group_size == -1:
            return cls("int", bits, symmetric, "tensor", None, **kw)
        return cls("int", bits, symmetric, "group", group_size, **kw)

    @classmethod
    def nf4(cls, block_size: int = 64, double_quant: bool = False) -> "QuantSpec":
        return cls("nf4", 4, True, "group", block_size, double_quant)

    @classmethod
    def fp4(cls, block_size: int = 64, double_quant: bool = False) -> "QuantSpec":
        return cls("fp4", 4, True, "group", block_size, double_quant)

    @classmethod
    def fp8(cls, variant: str = "e4m3", group_size: int | None = None) -> "QuantSpec":
        gran = "channel" if group_size is None else "group"
        return cls(f"fp8_{variant}", 8, True, gran, group_size, scale_dtype="float32")

    # ---- helpers ---------------------------------------------------------------------------
    @property
    def has_scale(self) -> bool:
        return self.format not in ("fp16", "bf16")

    @property
    def has_zero(self) -> bool:
        return self.format == "int" and not self.symmetric

    @property
    def float_zero(self) -> bool:
        return self.has_zero and self.zero_dtype != "int"

    @property
    def packed_bits(self) -> int:
        """Bits per stored element of the main data tensor."""
        return self.bits

    def describe(self) -> str:
        """Short human name, e.g. ``int4-g128-asym``, ``nf4-b64-dq``, ``int8-ch-sym``."""
        if self.format in ("fp16", "bf16"):
            return self.format
        name = f"int{self.bits}" if self.format == "int" else self.format
        gran = {"tensor": "-t", "channel": "-ch"}.get(self.granularity, f"-g{self.group_size}")
        if self.format in ("nf4", "fp4") and self.granularity == "group":
            gran = f"-b{self.group_size}"
        tail = ""
        if self.format == "int":
            tail = "-sym" if self.symmetric else "-asym"
            if self.zero_dtype != "int":
                tail += "-fz"
        if self.double_quant:
            tail += "-dq"
        return name + gran + tail

    def replace(self, **changes: Any) -> "QuantSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> "QuantSpec":
        return spec_from_dict(cls, data, where)


SpecT = TypeVar("SpecT")


def spec_from_dict(cls: type[SpecT], data: Any, where: str) -> SpecT:
    """Build a frozen spec dataclass from JSON data; unknown keys and bad values are InvalidSpecError."""
    if not isinstance(data, dict):
        raise InvalidSpecError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known, key=str)  # YAML keys need not be strings
    if unknown:
        raise InvalidSpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    try:
        return cls(**data)
    except (InvalidSpecError, TypeError) as exc:
        raise InvalidSpecError(f"{where}: {exc}") from None
