"""The Triton kernels' weight layout, and the one-time repacking of a QuantizedWeight into it.

The stored format (formats/codecs.py) packs codes along K row by row ([N, ceil(K/8)·b] bytes, 8-bit
codes as bytes, 3-bit codes 8 per 3 bytes). The kernels want instead:

* codes as **int32 words, transposed to [KW, N]**: a word holds ``CPW = 32 // bits`` consecutive-K
  codes of one output column, code j at bits [j·b, (j+1)·b). Loading a [BLOCK_K, BLOCK_N] tile then
  reads consecutive words across N (coalesced), and every bit width — 3, 5 and 6 included — has a
  word-aligned, constant-divisor address (k // CPW, (k % CPW)·b). 3/5/6-bit codes waste 2 of 32 bits
  (6.25 % more memory than the stored form); 2/4/8-bit words are full.
* scales (and zero-points) **transposed to [num_groups, N]**, so one K tile's scales are one
  contiguous vector over N. Double-quantized scales are decoded here, once, to float32 (exactly
  what the reference decodes); plain scales keep their stored dtype (fp16/bf16/fp32: exact in the
  kernels' float32 math). Integer zero-points are unpacked to uint8, float ones (HQQ) keep their dtype.
* codebook formats (nf4/fp4, and fp8 as a 256-entry table over its bytes) carry a float32 lookup table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import codecs
from lowbit.formats.codebooks import codebook
from lowbit.formats.packing import unpack
from lowbit.formats.primitives import scale_shape
from lowbit.tensor import QuantizedWeight

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_CODEBOOK_FORMATS = ("nf4", "fp4")


@dataclass(frozen=True)
class TritonWeight:
    """A weight W [N, K] in the Triton kernels' layout (see the module docstring).

    Attributes:
        codes: int32 [ceil(K / (32 // bits)), N]: unsigned codes, ``32 // bits`` per word along K.
        scale: [num_groups, N] float16/bfloat16/float32 (per-tensor scales are broadcast over N).
        zero: [num_groups, N] uint8 (integer zero-points) or float (real-valued ones), or None.
        lut: float32 [2**bits] code values (nf4/fp4/fp8), or None for affine integer formats.
        bits: bits per code (2…8).
        group_size: K columns sharing one scale; 0 when a single group spans K (channel/tensor).
        zero_const: the zero-point of symmetric integer codes (stored with an offset of 2**(bits-1)).
        shape: (N, K).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    lut: torch.Tensor | None
    bits: int
    group_size: int
    zero_const: float
    shape: tuple[int, int]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero, lut) pointers for a kernel; absent tensors are replaced by ``scale`` (never read)."""
        zero = self.zero if self.zero is not None else self.scale
        lut = self.lut if self.lut is not None else self.scale
        return self.codes, self.scale, zero, lut

    def kernel_meta(self) -> dict[str, object]:
        """The constexpr arguments :func:`lowbit.kernels.triton.tiles.dequant_tile` needs."""
        return {"BITS": self.bits, "GROUP": self.group_size, "HAS_ZERO": self.zero is not None,
                "ZERO_CONST": self.zero_const, "USE_LUT": self.lut is not None}


def supports(weight: QuantizedWeight) -> bool:
    """Integer formats (every bit width, sym/asym, integer or float zero-points, any granularity,
    plain or double-quantized scales), nf4/fp4 and fp8; not the plain fp16/bf16 casts (use F.linear)."""
    spec = weight.spec
    n, k = weight.shape
    if n < 1 or k < 1:
        return False
    if spec.format == "int":
        return 2 <= spec.bits <= 8
    return spec.format in _CODEBOOK_FORMATS or spec.format in _FP8


def prepare(weight: QuantizedWeight) -> TritonWeight:
    """Repack ``weight`` (on its device) into a :class:`TritonWeight`. Called once per weight and device."""
    if not supports(weight):
        raise ValueError(f"the Triton kernels do not handle {weight.spec.describe()} weights")
    spec, tensors = weight.spec, weight.tensors
    n, k = weight.shape
    device = tensors["qdata"].device
    rows, groups = scale_shape(weight.shape, spec)
    lut: torch.Tensor | None = None
    if spec.format in _FP8:
        codes, bits = tensors["qdata"].reshape(n, k), 8
        lut = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(_FP8[spec.format]).float()
    else:
        bits = spec.bits
        codes = unpack(tensors["qdata"], bits, k)
        if spec.format in _CODEBOOK_FORMATS:
            lut = codebook(spec.format)
    if spec.double_quant:
        scale = codecs.decode_scale(tensors, spec, weight.shape)  # float32 [R, G]
    else:
        scale = tensors["scale"].reshape(rows, groups)
    zero = None
    if spec.float_zero:
        zero = _groups_by_column(tensors["zero"].reshape(rows, groups), n)
    elif spec.has_zero:
        zero = _groups_by_column(codecs.decode_zero(tensors, spec, (rows, groups)).to(torch.uint8), n)
    symmetric_int = spec.format == "int" and spec.symmetric
    return TritonWeight(
        codes=pack_words(codes, bits),
        scale=_groups_by_column(scale, n),
        zero=zero,
        lut=None if lut is None else lut.to(device),
        bits=bits,
        group_size=spec.group_size or 0,  # None for per-channel/per-tensor specs
        zero_const=float(1 << (bits - 1)) if symmetric_int else 0.0,
        shape=(n, k),
    )


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (values < 2**bits) → int32 words [ceil(K / (32 // bits)), N] (see module docstring)."""
    n, k = codes.shape
    per_word = 32 // bits
    kw = -(-k // per_word)
    padded = torch.zeros(n, kw * per_word, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    grouped = padded.reshape(n, kw, per_word)
    word = torch.zeros(n, kw, dtype=torch.int64, device=codes.device)
    for j in range(per_word):  # one [N, KW] int64 temporary at a time
        word |= grouped[:, :, j].to(torch.int64) << (j * bits)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # two's-complement wrap into int32
    return word.to(torch.int32).t().contiguous()


def _groups_by_column(values: torch.Tensor, n: int) -> torch.Tensor:
    """[R, G] per-row group values → [G, N] (R is N, or 1 for per-tensor values, which are broadcast)."""
    return values.t().expand(values.shape[1], n).contiguous()
