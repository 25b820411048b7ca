"""Repack a stored weight once into the CPU kernels' tile layout (described in csrc/kernels.h).

Tiles of 16 output rows × K (padded to a multiple of 32 columns); inside a tile, blocks of 32
columns; inside a block, eight 64-byte sub-vectors of 16 rows × 4 consecutive columns (byte 4r+j =
row r, column 4s+j), which is the operand shape of ``vpdpbusd``: each 32-bit lane accumulates one
output row. Narrow codes share bytes between sub-vectors (4-bit: two per byte; 2-bit: four; 3-bit:
2-bit plane + one 64-bit mask per sub-vector for the third bit), so a prepared int4 weight is as
large as the stored one. Scales and zero-points become [T, G, 16] (fp16 when that is exact).

Everything a layer's kernel reads is one uint8 tensor (:func:`pack`): a 64-byte header of section
offsets, then codes, scales, zero-points and codebook tables, each 64-byte aligned. A compiled
decode step guards and converts every tensor input on every call, so one tensor per layer instead
of five is ~100 µs per token less on the demo model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lowbit.formats.codebooks import codebook
from lowbit.formats.packing import unpack
from lowbit.formats.spec import QuantSpec
from lowbit.tensor import QuantizedWeight

TILE_ROWS = 16
BLOCK = 32
KIND_U8, KIND_U4, KIND_U2, KIND_U3, KIND_LUT4 = range(5)
ISAS = {"auto": 0, "avx512": 1, "avx2_vnni": 2, "avx2": 3, "scalar": 4}
# Codebooks enter the integer dot products as round(S·value) + 128 (unsigned bytes): fp4's values
# (multiples of 1/12) are exact at S = 12; nf4's are rounded at S = 127 (≤ 0.4 % of the block absmax).
LUT_SCALE = {"nf4": 127.0, "fp4": 12.0}
# Decode-sized batches (≤ 8 rows) use int8 activations, where the weight read dominates; larger ones
# (prefill, perplexity, calibration forwards) take the exact path, so evaluating or calibrating a
# weight-only model measures the weight quantization alone.
INT_MAX_M = 8


PACKED_MAGIC = int.from_bytes(b"LOWPBW1", "little")
PACKED_HALF, PACKED_ZERO_CONST = 1, 2  # header flags
SECTIONS = ("codes", "scale", "zero", "lut", "table")
HEADER_BYTES = 64
_ALIGN = 64


@dataclass(frozen=True, eq=False)
class CpuPrepared:
    """A weight in the CPU kernel layout.

    Attributes:
        kind: KIND_* (how codes are stored in a block).
        out_features, in_features: N, K of W [N, K].
        group_size: columns per scale group (a multiple of 32; padded K for per-channel/tensor).
        packed: uint8 [bytes]: header + the sections below (see :func:`pack`); what the ops take.
        out_scale: 1/S for codebooks, else 1.
        int_max_m: batches of at most this many rows use int8 activations; larger ones the exact
            dequantize + matmul path.
        isa: ISAS value (0 = best available).

    Views of the sections (sharing ``packed``'s memory):
        codes: uint8 [T, tile_bytes] with T = ceil(N/16).
        scale: float16/float32 [T, G, 16]: per-group scale (codebooks: the block absmax).
        zero: same shape/dtype: W = (code − zero)·scale (codebooks: 128, the table offset); a
            zero-point that is the same everywhere (symmetric ints, codebooks) is one value [1].
        lut: uint8 [16] (codebooks: round(S·table) + 128, else empty).
        table: float32 [16] (codebooks: the float table for dequantization, else empty).
    """

    kind: int
    out_features: int
    in_features: int
    group_size: int
    packed: torch.Tensor
    out_scale: float
    int_max_m: int
    isa: int
    sections: tuple[tuple[int, torch.dtype, tuple[int, ...]], ...]  # (offset, dtype, shape) per SECTIONS name

    def section(self, name: str) -> torch.Tensor:
        offset, dtype, shape = self.sections[SECTIONS.index(name)]
        nbytes = dtype.itemsize * (int(torch.Size(shape).numel()))
        return self.packed[offset:offset + nbytes].view(dtype).reshape(shape)

    codes = property(lambda self: self.section("codes"))
    scale = property(lambda self: self.section("scale"))
    zero = property(lambda self: self.section("zero"))
    lut = property(lambda self: self.section("lut"))
    table = property(lambda self: self.section("table"))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensor (what the kernel reads per call, plus the header and tables)."""
        return self.packed.numel()


def kind_of(spec: QuantSpec) -> int | None:
    """The storage kind for ``spec``, or None when these kernels do not handle it."""
    if spec.granularity == "group" and (spec.group_size is None or spec.group_size % BLOCK):
        return None
    if spec.format in LUT_SCALE:
        return KIND_LUT4
    if spec.format != "int":
        return None
    return {8: KIND_U8, 6: KIND_U8, 5: KIND_U8, 4: KIND_U4, 3: KIND_U3, 2: KIND_U2}.get(spec.bits)


def supports(weight: QuantizedWeight) -> bool:
    """int2/3/4/5/6/8 (sym, asym with integer or float zero-points, any scale storage incl. double
    quant) and nf4/fp4, per tensor, per channel or in groups of a multiple of 32 columns, on CPU."""
    qdata = weight.tensors.get("qdata")
    return (kind_of(weight.spec) is not None and qdata is not None and qdata.device.type == "cpu"
            and qdata.dtype == torch.uint8)


def prepare(weight: QuantizedWeight, *, int_max_m: int | None = None, isa: str | None = None) -> CpuPrepared:
    """Repack ``weight`` for the CPU kernels (once; the stored tensors are left untouched).

    ``int_max_m``: inputs with at most this many rows take the int8-activation path, larger ones the
    exact path (default ``$LOWBIT_CPU_INT_MAX_M``, else :data:`INT_MAX_M`; a large value sends
    prefill through the integer path too, ~5-8× faster than the exact one at 256 rows). ``isa`` pins
    an instruction set (``ISAS`` keys; default ``$LOWBIT_CPU_ISA`` or ``auto``); one the CPU lacks
    falls back to the best available.
    """
    spec = weight.spec
    kind = kind_of(spec)
    if kind is None:
        raise ValueError(f"the CPU kernels do not handle {spec.describe()}")
    isa_name = isa or os.environ.get("LOWBIT_CPU_ISA", "auto")
    if isa_name not in ISAS:
        raise ValueError(f"unknown ISA {isa_name!r}; expected one of {sorted(ISAS)}")
    if int_max_m is None:
        int_max_m = int(os.environ.get("LOWBIT_CPU_INT_MAX_M", INT_MAX_M))
    n, k = weight.shape
    k_padded = -(-k // BLOCK) * BLOCK
    group_size = spec.group_size if spec.granularity == "group" else k_padded
    assert group_size is not None
    bits = 4 if kind == KIND_LUT4 else spec.bits
    codes = unpack(weight.tensors["qdata"], bits, k)  # uint8 [N, K]
    scale, zero = _group_params(weight, kind)
    empty_u8, empty_f = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)
    if kind == KIND_LUT4:
        values = codebook(spec.format)
        lut_scale = LUT_SCALE[spec.format]
        lut = (torch.round(values * lut_scale) + 128).to(torch.uint8)
        table, out_scale = values, 1.0 / lut_scale
    else:
        lut, table, out_scale = empty_u8, empty_f, 1.0
    packed, sections = pack({"codes": pack_tiles(codes, kind), "scale": scale, "zero": zero, "lut": lut,
                             "table": table.float()})
    return CpuPrepared(kind=kind, out_features=n, in_features=k, group_size=group_size, packed=packed,
                       out_scale=out_scale, int_max_m=int_max_m, isa=ISAS[isa_name], sections=sections)


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[tuple[int, torch.dtype, tuple[int, ...]], ...]]:
    """The SECTIONS tensors in one uint8 tensor: a 64-byte header (int64: magic, the byte offset of
    each section, flags, 0), then each section at a 64-byte-aligned offset (csrc/kernels.h)."""
    scale, zero = tensors["scale"], tensors["zero"]
    if scale.dtype != zero.dtype or scale.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scale and zero must share float16/float32, got {scale.dtype} and {zero.dtype}")
    flags = (PACKED_HALF if scale.dtype == torch.float16 else 0) | (PACKED_ZERO_CONST if zero.numel() == 1 else 0)
    offsets, chunks, position = [], [], HEADER_BYTES
    for name in SECTIONS:
        raw = tensors[name].contiguous().reshape(-1).view(torch.uint8)
        offsets.append(position)
        chunks.append((position, raw))
        position += -(-raw.numel() // _ALIGN) * _ALIGN
    packed = torch.zeros(max(position, HEADER_BYTES), dtype=torch.uint8)
    header = torch.tensor([PACKED_MAGIC, *offsets, flags, 0], dtype=torch.int64)
    packed[:HEADER_BYTES] = header.view(torch.uint8)
    for start, raw in chunks:
        packed[start:start + raw.numel()] = raw
    sections = tuple((offset, tensors[name].dtype, tuple(tensors[name].shape)) for name, offset in zip(SECTIONS, offsets))
    return packed, sections


def pack_tiles(codes: torch.Tensor, kind: int) -> torch.Tensor:
    """uint8 codes [N, K] → uint8 [T, tile_bytes] in the tile layout of ``kind``."""
    n, k = codes.shape
    tiles, k_padded = -(-n // TILE_ROWS), -(-k // BLOCK) * BLOCK
    nblk = k_padded // BLOCK
    padded = codes.new_zeros(tiles * TILE_ROWS, k_padded)
    padded[:n, :k] = codes
    # [T, r, b, s, j] → [T, b, s, r, j]: sub-vector s of block b is 16 rows × 4 columns, row-major
    sub = padded.reshape(tiles, TILE_ROWS, nblk, 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, nblk, 8, 64)
    if kind == KIND_U8:
        out = sub
    elif kind in (KIND_U4, KIND_LUT4):
        out = sub[:, :, 0::2] | (sub[:, :, 1::2] << 4)  # chunk c: s = 2c low, 2c+1 high nibble
    else:
        quad = sub.reshape(tiles, nblk, 2, 4, 64)  # chunk c holds s = 4c..4c+3
        low = quad & 3
        out = low[:, :, :, 0] | (low[:, :, :, 1] << 2) | (low[:, :, :, 2] << 4) | (low[:, :, :, 3] << 6)
        if kind == KIND_U3:
            high = ((quad >> 2) & 1).reshape(tiles, nblk, 2, 4, 8, 8)  # bit i of byte q = lane byte 8q+i
            weights = (1 << torch.arange(8, dtype=torch.int32)).reshape(1, 1, 1, 1, 1, 8)
            masks = (high.to(torch.int32) * weights).sum(-1).to(torch.uint8).reshape(tiles, nblk, 2, 32)
            out = torch.cat([out, masks], dim=-1)  # chunk: 64-byte low plane, then four uint64 masks
    return out.reshape(tiles, -1).contiguous()


def _group_params(weight: QuantizedWeight, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [T, G, 16] with W = (code − zero)·scale (codebooks: zero = 128, the lut offset)."""
    spec = weight.spec
    n = weight.shape[0]
    scale = weight.scale
    assert scale is not None
    scale = scale.float().expand(n, -1) if scale.shape[0] == 1 else scale.float()  # per-tensor → rows
    if kind == KIND_LUT4:
        zero = torch.full_like(scale, 128.0)
    elif spec.symmetric:
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))  # the storage offset of signed codes
    else:
        zp = weight.zero_point
        assert zp is not None
        zero = zp.float().expand(n, -1) if zp.shape[0] == 1 else zp.float()
    tiles = -(-n // TILE_ROWS)
    out = []
    for value in (scale, zero):
        padded = value.new_zeros(tiles * TILE_ROWS, value.shape[1])
        padded[:n] = value
        out.append(padded.reshape(tiles, TILE_ROWS, -1).transpose(1, 2).contiguous())  # [T, G, 16]
    scale_t, zero_t = out
    half = [t.to(torch.float16) for t in out]
    if all(torch.equal(h.float(), t) for h, t in zip(half, out)):  # exact in fp16: half the bytes
        scale_t, zero_t = half
    if kind == KIND_LUT4 or spec.symmetric:  # constant: not stored per group (less to read per call)
        zero_t = zero_t.new_full((1,), zero_t.reshape(-1)[0].item())
    return scale_t, zero_t
