"""Numeric formats: the spec, bit packing, codebooks and the reference quantize/dequantize math."""

from lowbit.formats.codebooks import FP4_VALUES, NF4_VALUES
from lowbit.formats.packing import pack, unpack
from lowbit.formats.primitives import max_abs_error, mse, sqnr_db
from lowbit.formats.spec import FORMATS, QuantSpec

__all__ = ["FORMATS", "FP4_VALUES", "NF4_VALUES", "QuantSpec", "max_abs_error", "mse", "pack", "sqnr_db", "unpack"]
