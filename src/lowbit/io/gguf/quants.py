"""GGUF block quantization in vectorised torch: float ⇄ the exact bytes a GGUF tensor stores.

Types: F32, F16, BF16, the legacy 32-weight blocks Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (here) and the
256-weight k-quants Q2_K … Q6_K (:mod:`lowbit.io.gguf.quants_k`). A weight [N, K] is a matrix of N
rows of K values, contiguous along K as GGUF stores a row; its bytes are uint8 [N, row_bytes(K)].

Without importance the legacy types are byte-identical to ``gguf.quants.quantize`` (llama.cpp's
reference rounding); the k-quants follow llama.cpp's reference searches. With ``importance`` (what
llama.cpp's imatrix holds: the mean of x² of each input column over calibration data) every type
uses llama.cpp's importance-weighted searches. Work proceeds in row chunks, so memory stays bounded.

:func:`from_quantized_weight` / :func:`to_quantized_weight` map lowbit integer weights to legacy
GGUF blocks code-for-code (GPTQ/AWQ's choices survive export) and back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Union

import torch

from lowbit.errors import InvalidSpecError, InvalidWeightError, ShapeError
from lowbit.io.gguf import quants_k as K
from lowbit.io.gguf.quants_k import half, half_bytes, make_qkx_quants, make_qx_quants
from lowbit.io.gguf.search_torch import f32

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

    from lowbit.tensor import QuantizedWeight

QType = Union["GGMLQuantizationType", int, str]
Tensor = torch.Tensor

CHUNK_ELEMS = 1 << 21  # weights per row chunk (8 MiB of float32): big enough for both cores to share each op

TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


# ---- type table ------------------------------------------------------------------------------------
def type_from_name(name: str) -> "GGMLQuantizationType":
    """``"q4_k"`` → ``GGMLQuantizationType.Q4_K`` (case-insensitive); unknown → InvalidSpecError."""
    from gguf import GGMLQuantizationType

    key = str(name).strip().upper()
    if key not in TYPE_NAMES:
        raise InvalidSpecError(f"unknown or unsupported GGUF type {name!r}; supported: {', '.join(TYPE_NAMES)}")
    return GGMLQuantizationType[key]


def resolve_type(qtype: QType) -> "GGMLQuantizationType":
    """A supported GGUF type from a GGMLQuantizationType, its integer id or its name."""
    from gguf import GGMLQuantizationType

    if isinstance(qtype, str):
        return type_from_name(qtype)
    try:
        t = GGMLQuantizationType(int(qtype))
    except (ValueError, TypeError):
        raise InvalidSpecError(f"unknown GGUF type {qtype!r}; supported: {', '.join(TYPE_NAMES)}") from None
    if t.name not in TYPE_NAMES:
        raise InvalidSpecError(f"GGUF type {t.name} is not supported by lowbit; supported: {', '.join(TYPE_NAMES)}")
    return t


def block_size(qtype: QType) -> int:
    """Weights per block (1 for F32/F16/BF16, 32 for the legacy types, 256 for k-quants)."""
    from gguf import GGML_QUANT_SIZES

    return int(GGML_QUANT_SIZES[resolve_type(qtype)][0])


def type_size(qtype: QType) -> int:
    """Bytes per block."""
    from gguf import GGML_QUANT_SIZES

    return int(GGML_QUANT_SIZES[resolve_type(qtype)][1])


def can_encode(qtype: QType, k: int) -> bool:
    """Whether rows of ``k`` values can be stored as ``qtype`` (a supported type whose block divides k)."""
    try:
        return k > 0 and k % block_size(qtype) == 0
    except InvalidSpecError:
        return False


def row_bytes(qtype: QType, k: int, name: str = "weight") -> int:
    """Bytes of one row of ``k`` values; ShapeError when the block size does not divide k."""
    bs = block_size(qtype)
    if k <= 0 or k % bs:
        raise ShapeError(f"{name}: row length {k} is not a multiple of the {resolve_type(qtype).name} "
                         f"block size {bs}")
    return k // bs * type_size(qtype)


# ---- public entry points ---------------------------------------------------------------------------
def quantize(weight: Tensor, qtype: QType, importance: Tensor | None = None, name: str = "weight") -> Tensor:
    """Quantize a float weight [N, K] (a 1-D tensor is one row) to GGUF ``qtype``.

    Args:
        weight: float [N, K], rows = output features, contiguous along K (the input dimension).
        qtype: GGMLQuantizationType, its id or its name (``"q4_k"``).
        importance: optional float [K] ≥ 0, per-input-column importance (llama.cpp's imatrix: mean x²
            of the layer's inputs); switches to importance-weighted rounding. Ignored for F32/F16/BF16.
        name: named in errors.
    Returns:
        uint8 [N, K // block_size · type_size]: exactly the bytes GGUF stores.
    Raises:
        ShapeError: K not a multiple of the block size, or importance not [K].
        InvalidWeightError: NaN/Inf in weight or importance, negative importance, or magnitudes that
            overflow float16 (F16 values, block scales).
    """
    from lowbit.tensor import as_2d, check_finite

    t = resolve_type(qtype)
    w2d = as_2d(weight.detach() if isinstance(weight, torch.Tensor) else weight, name)
    n, k = int(w2d.shape[0]), int(w2d.shape[1])
    nbytes = row_bytes(t, k, name)
    imp = None if importance is None or t.name in ("F32", "F16", "BF16") else _check_importance(importance, k, name)
    encode = _ENCODERS[t.name]
    out = torch.empty(n, nbytes, dtype=torch.uint8, device=w2d.device)
    workers = torch.get_num_threads() if w2d.device.type == "cpu" else 1
    rows = max(1, min(CHUNK_ELEMS // k, -(-n // workers)))

    def run(r0: int) -> None:
        chunk = w2d[r0:r0 + rows].float()
        if not torch.isfinite(chunk.abs().amax()):  # amax propagates NaN; cheaper than isfinite(chunk)
            check_finite(w2d, name)  # raises, counting the bad values
        try:
            out[r0:r0 + rows] = encode(chunk, imp)
        except InvalidWeightError as exc:
            raise InvalidWeightError(f"{name}: {exc} ({t.name})") from None

    starts = range(0, n, rows)
    if workers == 1 or len(starts) == 1:
        for r0 in starts:
            run(r0)
        return out
    # Row chunks in parallel, each on one thread. The searches are many small ops; with torch's own
    # OpenMP threads each op ends in a barrier, and on a busy machine the spinning threads starve the
    # working ones (Q4_K of a 2048×5632 matrix: 70 s vs 1.4 s with two other processes running).
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for _ in pool.map(run, starts):
                pass
    finally:
        torch.set_num_threads(workers)
    return out


def dequantize(data: Tensor, qtype: QType, shape: tuple[int, int]) -> Tensor:
    """Stored GGUF bytes uint8 [N, row_bytes] of a weight of ``shape`` (N, K) → float32 [N, K].

    Bitwise equal to ``gguf.quants.dequantize`` (and ggml's dequantize_row_*)."""
    t = resolve_type(qtype)
    n, k = int(shape[0]), int(shape[1])
    nbytes = row_bytes(t, k)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise InvalidWeightError(f"GGUF {t.name} data must be a uint8 tensor, got {getattr(data, 'dtype', type(data))}")
    if data.numel() != n * nbytes:
        raise ShapeError(f"GGUF {t.name} data has {data.numel()} bytes; shape {(n, k)} needs {n * nbytes}")
    data = data.reshape(n, nbytes)
    decode = _DECODERS[t.name]
    out = torch.empty(n, k, dtype=torch.float32, device=data.device)
    rows = max(1, CHUNK_ELEMS // k)
    for r0 in range(0, n, rows):
        out[r0:r0 + rows] = decode(data[r0:r0 + rows].contiguous()).reshape(-1, k)
    return out


def _check_importance(importance: Tensor, k: int, name: str) -> Tensor:
    """Validated importance [K] float32, scaled by a power of two to a mean near 1 (the searches are
    scale-invariant and a power of two rounds nothing, so only overflow is avoided)."""
    imp = torch.as_tensor(importance).detach().float().reshape(-1)
    if imp.numel() != k:
        raise ShapeError(f"{name}: importance has {imp.numel()} values; the weight has {k} input columns")
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise InvalidWeightError(f"{name}: importance must be finite and non-negative")
    mean = float(imp.mean())
    if mean == 0.0:
        return torch.ones_like(imp)
    imp = imp * 2.0 ** -round(math.log2(mean))
    # a group of columns that never mattered would make the weighted searches degenerate (scale 0):
    # give such 16-column groups the mean importance instead
    groups = imp.view(-1, 16)
    dead = groups.sum(-1, keepdim=True) == 0
    return torch.where(dead, imp.mean(), groups).reshape(-1)


# ---- floats ----------------------------------------------------------------------------------------
def _encode_f32(x: Tensor, imp: Tensor | None) -> Tensor:
    return x.contiguous().view(torch.uint8)


def _encode_f16(x: Tensor, imp: Tensor | None) -> Tensor:
    h = x.to(torch.float16)
    if h.numel() and not torch.isfinite(h.abs().amax()):
        raise InvalidWeightError("values overflow float16 (|x| > 65504); use BF16 or F32")
    return h.view(torch.uint8)


def _encode_bf16(x: Tensor, imp: Tensor | None) -> Tensor:
    return x.to(torch.bfloat16).view(torch.uint8)


# ---- legacy 32-weight blocks -----------------------------------------------------------------------
def _blocks(x: Tensor, imp: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Rows x [R, K] → blocks [R·K/32, 32]; with importance also llama.cpp's weights
    ``imp·sqrt(σ²_row + x²)`` laid out as columns [32, R·K/32] (the searches' layout)."""
    r, k = x.shape
    xb = x.reshape(-1, 32)
    if imp is None:
        return xb, None
    sigma2 = (x * x).sum(-1) / k
    w = imp.view(1, k) * torch.sqrt(sigma2.view(r, 1) + x * x)
    return xb, K.columns(w, 32)


def _weighted_symmetric(xb: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Importance path of Q4_0/Q5_0/Q8_0: make_qx_quants → (d [B], codes [B, 32] in [0, 2·nmax − 1])."""
    d, codes = make_qx_quants(xb.t().contiguous(), nmax, w)
    return d, codes.t()


def _symmetric(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Reference Q4_0/Q5_0 rounding: d = max/−nmax (max: the signed value of largest |x|), codes
    ``trunc(x/d + nmax + ½)`` clipped to [0, 2·nmax − 1]. Returns (d float32 [B], codes uint8 [B, 32])."""
    vmax = K.signed_absmax(x, 1)[1]
    d = vmax / -nmax
    inv = torch.where(d == 0, 0.0, K.fdiv(1.0, torch.where(d == 0, 1.0, d)))
    q = torch.trunc(x * inv.unsqueeze(-1) + f32(nmax + 0.5)).clamp_(0, 2 * nmax - 1)
    return d, q.to(torch.uint8)


def _affine(x: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference Q4_1/Q5_1 rounding: d = (max − min)/nmax, m = min, codes ``trunc((x − min)/d + ½)``."""
    vmin, vmax = x.amin(dim=-1), x.amax(dim=-1)
    d = (vmax - vmin) / nmax
    inv = torch.where(d == 0, 0.0, K.fdiv(1.0, torch.where(d == 0, 1.0, d)))
    q = torch.trunc((x - vmin.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5).clamp_(0, nmax)
    return d, vmin, q.to(torch.uint8)


def _nibbles(q: Tensor) -> Tensor:
    """Codes [B, 32] → 16 bytes: byte j = element j (low nibble) | element j + 16 (high nibble)."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: Tensor) -> Tensor:
    """Bit 4 of codes [B, 32] as a little-endian uint32 (bit j = element j) → 4 bytes [B, 4]."""
    bits = ((q.to(torch.uint8) >> 4) & 1).reshape(-1, 4, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def pack_legacy(name: str, d: Tensor, m: Tensor | None, codes: Tensor) -> Tensor:
    """Legacy blocks, one per row: scale d (and min m, *_1 types) float16 [B], codes [B, 32] as stored
    (Q4_*: 0..15, Q5_*: 0..31, Q8_0: signed −128..127) → bytes uint8 [B, type_size]."""
    parts = [half_bytes(d)] + ([] if m is None else [half_bytes(m)])
    if name == "Q8_0":
        parts.append(codes.to(torch.int8).view(torch.uint8))
    else:
        parts += [_high_bits(codes)] if name.startswith("Q5") else []
        parts.append(_nibbles(codes))
    return torch.cat(parts, 1)


def _encode_q4_0(x: Tensor, imp: Tensor | None) -> Tensor:
    xb, w = _blocks(x, imp)
    d, q = _symmetric(xb, 8) if w is None else _weighted_symmetric(xb, w, 8)
    return pack_legacy("Q4_0", half(d), None, q).reshape(x.shape[0], -1)


def _encode_q5_0(x: Tensor, imp: Tensor | None) -> Tensor:
    xb, w = _blocks(x, imp)
    d, q = _symmetric(xb, 16) if w is None else _weighted_symmetric(xb, w, 16)
    return pack_legacy("Q5_0", half(d), None, q).reshape(x.shape[0], -1)


def _affine_search(xb: Tensor, w: Tensor | None, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    if w is None:
        return _affine(xb, nmax)
    scale, neg_min, q = make_qkx_quants(xb.t().contiguous(), w, nmax, -0.9, 0.05, 36, use_mad=False)
    return scale, -neg_min, q.t()


def _encode_q4_1(x: Tensor, imp: Tensor | None) -> Tensor:
    d, m, q = _affine_search(*_blocks(x, imp), 15)
    return pack_legacy("Q4_1", half(d), half(m), q).reshape(x.shape[0], -1)


def _encode_q5_1(x: Tensor, imp: Tensor | None) -> Tensor:
    d, m, q = _affine_search(*_blocks(x, imp), 31)
    return pack_legacy("Q5_1", half(d), half(m), q).reshape(x.shape[0], -1)


def _round_half_away(v: Tensor) -> Tensor:
    """C's roundf (ties away from zero), computed as gguf's np_roundf does."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _encode_q8_0(x: Tensor, imp: Tensor | None) -> Tensor:
    xb, w = _blocks(x, imp)
    if w is None:
        d = xb.abs().amax(dim=-1) / 127
        inv = torch.where(d == 0, 0.0, K.fdiv(1.0, torch.where(d == 0, 1.0, d)))
        q = _round_half_away(xb * inv.unsqueeze(-1))
    else:  # llama.cpp ignores the imatrix for Q8_0; lowbit runs the weighted symmetric search
        d, codes = _weighted_symmetric(xb, w, 128)
        q = codes - 128
    return pack_legacy("Q8_0", half(d), None, q).reshape(x.shape[0], -1)


def _f16(b: Tensor) -> Tensor:
    """Two bytes per row [B, 2] → float32 [B, 1]."""
    return b.contiguous().view(torch.float16).float()


def _unnibble(qs: Tensor) -> Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], 1)


def _unhigh(qh: Tensor) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(-1, 32)


def _decode_q4_0(data: Tensor) -> Tensor:
    b = data.reshape(-1, 18)
    return _f16(b[:, :2]) * (_unnibble(b[:, 2:]).to(torch.int8) - 8).float()


def _decode_q4_1(data: Tensor) -> Tensor:
    b = data.reshape(-1, 20)
    return _f16(b[:, :2]) * _unnibble(b[:, 4:]).float() + _f16(b[:, 2:4])


def _decode_q5_0(data: Tensor) -> Tensor:
    b = data.reshape(-1, 22)
    q = _unnibble(b[:, 6:]) | (_unhigh(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.to(torch.int8) - 16).float()


def _decode_q5_1(data: Tensor) -> Tensor:
    b = data.reshape(-1, 24)
    q = _unnibble(b[:, 8:]) | (_unhigh(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _decode_q8_0(data: Tensor) -> Tensor:
    b = data.reshape(-1, 34)
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _k(encode: K.Encoder) -> K.Encoder:
    """A k-quant super-block encoder as a row-chunk encoder: rows [R, K] (+ importance [K]) → bytes [R, ·]."""
    def rows(x: Tensor, imp: Tensor | None) -> Tensor:
        r, k = x.shape
        wb = None if imp is None else imp.view(1, k).expand(r, k).reshape(-1, K.QK_K)
        return encode(x.reshape(-1, K.QK_K), wb).reshape(r, -1)
    return rows


_ENCODERS: dict[str, K.Encoder] = {
    "F32": _encode_f32, "F16": _encode_f16, "BF16": _encode_bf16,
    "Q8_0": _encode_q8_0, "Q4_0": _encode_q4_0, "Q4_1": _encode_q4_1, "Q5_0": _encode_q5_0, "Q5_1": _encode_q5_1,
    "Q2_K": _k(K.quantize_q2_k), "Q3_K": _k(K.quantize_q3_k), "Q4_K": _k(K.quantize_q4_k),
    "Q5_K": _k(K.quantize_q5_k), "Q6_K": _k(K.quantize_q6_k),
}

_DECODERS: dict[str, K.Decoder] = {
    "F32": lambda d: d.view(torch.float32), "F16": lambda d: d.view(torch.float16).float(),
    "BF16": lambda d: d.view(torch.bfloat16).float(),
    "Q8_0": _decode_q8_0, "Q4_0": _decode_q4_0, "Q4_1": _decode_q4_1, "Q5_0": _decode_q5_0, "Q5_1": _decode_q5_1,
    "Q2_K": lambda d: K.dequantize_q2_k(d.reshape(-1, 84)), "Q3_K": lambda d: K.dequantize_q3_k(d.reshape(-1, 110)),
    "Q4_K": lambda d: K.dequantize_q4_k(d.reshape(-1, 144)), "Q5_K": lambda d: K.dequantize_q5_k(d.reshape(-1, 176)),
    "Q6_K": lambda d: K.dequantize_q6_k(d.reshape(-1, 210)),
}


# ---- lowbit integer weights ⇄ legacy blocks, code for code ----------------------------------------
_INT_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}


def from_quantized_weight(qw: "QuantizedWeight") -> "tuple[GGMLQuantizationType, Tensor, float] | None":
    """A lowbit integer weight as GGUF legacy blocks with the *same integer codes* (no re-rounding).

    int4 sym → Q4_0, int4 asym (integer zero-points) → Q4_1, int5 sym → Q5_0, int5 asym → Q5_1,
    int8 sym → Q8_0, when every 32-block lies inside one lowbit group: granularity 'group' with
    group_size a multiple of 32, or 'channel'/'tensor' with K a multiple of 32 (each 32-block repeats
    its group's scale). The block scale is d = S rounded to float16 and, for *_1, m = −Z·S rounded
    to float16; lowbit's sym codes q (value q·S) are stored as q + 2^(b−1) (Q8_0: q itself),
    asym codes q (value (q − Z)·S) as q.

    Returns (type, bytes uint8 [N, row_bytes], max |dequantize(bytes) − qw.dequantize()|) — 0.0 for
    symmetric specs whose scales are float16 — or None when the spec does not fit (nf4/fp4/fp8,
    float zero-points, 2/3/6 bits, groups not a multiple of 32, scales beyond float16's range).
    """
    from gguf import GGMLQuantizationType

    from lowbit.formats.packing import unpack

    spec = qw.spec
    if spec.format != "int" or spec.float_zero or (spec.bits, spec.symmetric) not in _INT_TYPES:
        return None
    name = _INT_TYPES[(spec.bits, spec.symmetric)]
    n, k = qw.shape
    if k % 32 or (spec.granularity == "group" and spec.group_size % 32):
        return None
    scale, zero = qw.scale, qw.zero_point  # [R, G] float32
    assert scale is not None and zero is not None
    group = spec.group_size if spec.granularity == "group" else k
    scale = scale.expand(n, k // group) if spec.granularity == "tensor" else scale.reshape(n, k // group)
    zero = zero.expand(n, k // group) if spec.granularity == "tensor" else zero.reshape(n, k // group)
    d = scale.repeat_interleave(group // 32, dim=1).to(torch.float16)  # [N, K/32]
    m = None if spec.symmetric else (-zero * scale).repeat_interleave(group // 32, dim=1).to(torch.float16)
    if not torch.isfinite(d).all() or (m is not None and not torch.isfinite(m).all()):
        return None
    codes = unpack(qw.tensors["qdata"], spec.bits, k)  # uint8 [N, K], stored (offset) codes
    stored = (codes.view(torch.int8) ^ -128) if name == "Q8_0" else codes  # Q8_0 keeps q = code − 128
    data = pack_legacy(name, d.reshape(-1), None if m is None else m.reshape(-1), stored.reshape(-1, 32))
    data = data.reshape(n, -1)
    t = GGMLQuantizationType[name]
    offset = float(1 << (spec.bits - 1)) if spec.symmetric else 0.0
    err = 0.0
    rows = max(1, CHUNK_ELEMS // k)
    for r0 in range(0, n, rows):  # lowbit's own dequantization formula, (q − Z)·S, chunk by chunk
        q = (codes[r0:r0 + rows].float() - offset).view(-1, k // group, group)
        ref = (q - zero[r0:r0 + rows].unsqueeze(-1)) * scale[r0:r0 + rows].unsqueeze(-1)
        ours = dequantize(data[r0:r0 + rows], t, (ref.shape[0], k))
        err = max(err, (ours - ref.reshape(-1, k)).abs().max().item())
    return t, data, err


def to_quantized_weight(qtype: QType, data: Tensor, shape: tuple[int, int]) -> "QuantizedWeight | None":
    """GGUF Q4_0 / Q5_0 / Q8_0 bytes [N, row_bytes] as a lowbit int4 / int5 / int8 symmetric weight with
    groups of 32 and float16 scales, holding the same codes: its ``dequantize()`` equals
    :func:`dequantize` bitwise. (Scales keep GGUF's sign: llama.cpp's d is often negative.)
    Other types → None (import them through :func:`dequantize`)."""
    from lowbit.formats.packing import pack
    from lowbit.formats.spec import QuantSpec
    from lowbit.tensor import QuantizedWeight

    try:
        t = resolve_type(qtype)
    except InvalidSpecError:
        return None  # a type lowbit does not encode: dequantize() names it
    bits = {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8}.get(t.name)
    if bits is None:
        return None
    n, k = int(shape[0]), int(shape[1])
    nbytes = row_bytes(t, k)
    if data.dtype != torch.uint8 or data.numel() != n * nbytes:
        raise ShapeError(f"GGUF {t.name} data {tuple(data.shape)} {data.dtype} does not fit shape {(n, k)}")
    blocks = data.reshape(-1, type_size(t))
    d = _f16(blocks[:, :2]).to(torch.float16).reshape(n, k // 32)
    if t.name == "Q8_0":
        codes = blocks[:, 2:].view(torch.int8) ^ -128  # stored offset code: q + 128
    elif t.name == "Q5_0":
        codes = _unnibble(blocks[:, 6:]) | (_unhigh(blocks[:, 2:6]) << 4)
    else:
        codes = _unnibble(blocks[:, 2:])
    tensors = {"qdata": pack(codes.reshape(n, k).view(torch.uint8), bits), "scale": d}
    return QuantizedWeight(QuantSpec.int_(bits, 32, symmetric=True), (n, k), tensors)
