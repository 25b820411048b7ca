"""Encode a float weight into a format's stored tensors, and decode it back (pure torch reference).

Stored tensors of a weight [N, K] (R×G = the spec's scale shape, see primitives.scale_shape):

=========== ======================== =========================================================
name        dtype / shape            meaning
=========== ======================== =========================================================
qdata       uint8 [N, ceil(K/8)*b]   b-bit codes, bit-packed along K (formats/packing.py);
            fp8: uint8 [N, K]        float8 bytes; fp16/bf16: that dtype [N, K]
scale       scale_dtype [R, G]       per-group scale (int: S; nf4/fp4: block absmax; fp8: amax/fmax)
zero        uint8 [R, ceil(G/8)*b]   asymmetric int only: b-bit zero-points, packed along G
            zero_dtype [R, G]        … or real-valued zero-points when spec.zero_dtype is a float
scale_q     int8 [R, G]              double_quant: 8-bit codes of (scale − scale_offset) …
scale_scale float32 [ceil(R*G/256)]  … one fp32 scale per 256 codes …
scale_offset float32 [1]             … and the mean of the first-level scales
=========== ======================== =========================================================

Symmetric int codes are stored unsigned with an offset of 2**(b-1) (the zero-point itself is 0).
"""

from __future__ import annotations

import torch

from lowbit.formats import primitives as P
from lowbit.formats.codebooks import codebook
from lowbit.formats.packing import pack, unpack
from lowbit.formats.spec import DOUBLE_QUANT_BLOCK, QuantSpec
from lowbit.errors import InvalidSpecError

TensorDict = dict[str, torch.Tensor]

_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SCALE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SCALE_DTYPES = SCALE_TORCH_DTYPES
_SCALE_MIN = {"float16": 2.0**-24, "bfloat16": 1e-30, "float32": 1e-30}


def encode(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> TensorDict:
    """Quantize a float weight [N, K] to ``spec`` by round-to-nearest. Returns the stored tensors."""
    w = weight.float()
    if spec.format in ("fp16", "bf16"):
        return {"qdata": w.to(torch.float16 if spec.format == "fp16" else torch.bfloat16)}
    x = P.grouped(w, spec, name)
    if spec.format == "int":
        scale, zero = int_qparams(w, spec, name)
        return encode_int(w, spec, scale, zero, name)
    if spec.format in ("nf4", "fp4"):
        absmax = x.abs().amax(dim=-1)
        stored = _store_scale(absmax, spec)
        absmax = _load_scale(stored, spec, absmax.shape)
        codes = P.quantize_codebook(x, absmax.clamp(min=1e-12), codebook(spec.format))
        return {"qdata": pack(codes.reshape(w.shape), 4), **stored}
    fp8 = _FP8[spec.format]
    fmax = torch.finfo(fp8).max
    scale = (x.abs().amax(dim=-1) / fmax).clamp(min=1e-12)
    stored = _store_scale(scale, spec)
    scale = _load_scale(stored, spec, scale.shape)
    q = (x / scale.unsqueeze(-1)).clamp(-fmax, fmax).to(fp8)
    return {"qdata": q.reshape(w.shape).view(torch.uint8), **stored}


def int_qparams(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero-point [R, G] for ``weight`` [N, K], the scale as it will be stored."""
    x = P.grouped(weight.float(), spec, name)
    scale, zero = P.choose_qparams(x, spec.bits, spec.symmetric)
    scale = stored_scale(scale, spec)
    if not spec.symmetric:
        zero = P.zero_from_scale(x, scale, spec.bits)  # zero-point for the scale actually stored
    return scale, zero


def stored_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``scale`` after a round trip through its storage (fp16 cast or double quantization), as float32."""
    return _load_scale(_store_scale(scale.float(), spec), spec, scale.shape)


def encode_int(weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor, name: str = "weight") -> TensorDict:
    """Store ``weight`` [N, K] with *given* scale/zero [R, G] (how GPTQ/AWQ/HQQ hand over their choices)."""
    x = P.grouped(weight.float(), spec, name)
    stored = _store_scale(scale.float(), spec)
    scale = _load_scale(stored, spec, scale.shape)  # quantize against the scale as stored
    if spec.float_zero:
        stored["zero"] = zero.to(_SCALE_DTYPES[spec.zero_dtype])
        zero = stored["zero"].float()  # … and against the zero-point as stored
    q = P.quantize_affine(x, scale, zero, spec.bits, spec.symmetric)
    if spec.symmetric:
        q = q + (1 << (spec.bits - 1))
    elif not spec.float_zero:
        stored["zero"] = pack(zero.to(torch.uint8), spec.bits)
    stored["qdata"] = pack(q.to(torch.uint8).reshape(weight.shape), spec.bits)
    return stored


def decode(tensors: TensorDict, spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize stored tensors back to a float weight of ``shape`` [N, K] in ``dtype``."""
    n, k = shape
    qdata = tensors["qdata"]
    if spec.format in ("fp16", "bf16"):
        return qdata.to(dtype)
    sshape = P.scale_shape(shape, spec)
    scale = _load_scale(tensors, spec, sshape)
    if spec.format == "int":
        codes = unpack(qdata, spec.bits, k).float()
        zero = decode_zero(tensors, spec, sshape)
        if spec.symmetric:
            codes = codes - (1 << (spec.bits - 1))
        x = P.dequantize_affine(P.grouped(codes, spec), scale, zero)
    elif spec.format in ("nf4", "fp4"):
        codes = unpack(qdata, 4, k)
        x = P.dequantize_codebook(P.grouped(codes, spec), scale, codebook(spec.format))
    else:
        q = qdata.view(_FP8[spec.format]).float()
        x = P.grouped(q, spec) * scale.unsqueeze(-1)
    return x.reshape(n, k).to(dtype)


def decode_zero(tensors: TensorDict, spec: QuantSpec, sshape: tuple[int, int]) -> torch.Tensor:
    """Integer zero-points [R, G] as float32 (zeros for symmetric specs)."""
    if not spec.has_zero:
        return torch.zeros(sshape, dtype=torch.float32, device=tensors["qdata"].device)
    if spec.float_zero:
        return tensors["zero"].float().reshape(sshape)
    return unpack(tensors["zero"], spec.bits, sshape[1]).float()


def encode_on_grid(weight: torch.Tensor, tensors: TensorDict, spec: QuantSpec, name: str = "weight") -> TensorDict:
    """Store ``weight`` [N, K] on the quantization grid of an existing stored weight (``tensors``): its
    scales (and zero-points) are kept, only the codes are chosen anew, by round-to-nearest.

    Used to fold a small update (a merged adapter) into a quantized weight without re-rounding the
    whole matrix onto fresh scales. Int, NF4 and FP4 formats; others raise InvalidSpecError.
    """
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    sshape = P.scale_shape(shape, spec)
    if spec.format == "int":
        return encode_int(weight, spec, _load_scale(tensors, spec, sshape), decode_zero(tensors, spec, sshape), name)
    if spec.format in ("nf4", "fp4"):
        x = P.grouped(weight.float(), spec, name)
        absmax = _load_scale(tensors, spec, sshape).clamp(min=1e-12)
        codes = P.quantize_codebook(x, absmax, codebook(spec.format))
        kept = {k: v.clone() for k, v in tensors.items() if k != "qdata"}
        return {"qdata": pack(codes.reshape(shape), 4), **kept}
    raise InvalidSpecError(f"{name}: keeping the quantization grid is supported for int/nf4/fp4, not {spec.format}")


def decode_scale(tensors: TensorDict, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """First-level scales [R, G] as float32 for a weight of ``shape``."""
    return _load_scale(tensors, spec, P.scale_shape(shape, spec))


def store_scale(scale: torch.Tensor, spec: QuantSpec) -> TensorDict:
    """The stored tensors of first-level scales [R, G] (``scale``, or the double-quantized triple)."""
    return _store_scale(scale.float(), spec)


def _store_scale(scale: torch.Tensor, spec: QuantSpec) -> TensorDict:
    if spec.double_quant:
        codes, block_scale, offset = P.double_quantize(scale, DOUBLE_QUANT_BLOCK)
        return {"scale_q": codes.reshape(scale.shape), "scale_scale": block_scale, "scale_offset": offset}
    dtype = _SCALE_DTYPES[spec.scale_dtype]
    return {"scale": scale.clamp(min=_SCALE_MIN[spec.scale_dtype]).to(dtype)}


def _load_scale(tensors: TensorDict, spec: QuantSpec, sshape: tuple[int, ...]) -> torch.Tensor:
    if spec.double_quant:
        flat = P.double_dequantize(tensors["scale_q"], tensors["scale_scale"], tensors["scale_offset"], DOUBLE_QUANT_BLOCK)
        return flat.reshape(sshape).clamp(min=1e-12)
    return tensors["scale"].float().reshape(sshape)


def stored_layout(spec: QuantSpec, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} that :func:`encode` produces for a weight of ``shape`` [N, K]."""
    from lowbit.formats.packing import packed_row_bytes

    n, k = shape
    if spec.format in ("fp16", "bf16"):
        return {"qdata": ((n, k), torch.float16 if spec.format == "fp16" else torch.bfloat16)}
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if spec.format.startswith("fp8"):
        layout["qdata"] = ((n, k), torch.uint8)
    else:
        layout["qdata"] = ((n, packed_row_bytes(k, spec.bits)), torch.uint8)
    r, g = P.scale_shape(shape, spec)
    if spec.double_quant:
        layout["scale_q"] = ((r, g), torch.int8)
        layout["scale_scale"] = (((r * g + DOUBLE_QUANT_BLOCK - 1) // DOUBLE_QUANT_BLOCK,), torch.float32)
        layout["scale_offset"] = ((1,), torch.float32)
    else:
        layout["scale"] = ((r, g), _SCALE_DTYPES[spec.scale_dtype])
    if spec.float_zero:
        layout["zero"] = ((r, g), _SCALE_DTYPES[spec.zero_dtype])
    elif spec.has_zero:
        layout["zero"] = ((r, packed_row_bytes(g, spec.bits)), torch.uint8)
    return layout
