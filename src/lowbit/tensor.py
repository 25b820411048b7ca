"""QuantizedWeight: the one core abstraction for a stored (quantized) weight matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import InvalidWeightError, ShapeError
from lowbit.formats import codecs
from lowbit.formats.primitives import scale_shape
from lowbit.formats.spec import QuantSpec


@dataclass
class QuantizedWeight:
    """A weight matrix W [out_features, in_features] stored in a quantized format.

    ``tensors`` holds the stored pieces, named as documented in :mod:`lowbit.formats.codecs`
    (``qdata`` bit-packed codes, ``scale``, ``zero``, double-quant ``scale_q``/``scale_scale``/
    ``scale_offset``). ``y = x @ dequantize().T`` is the meaning every kernel must reproduce.
    """

    spec: QuantSpec
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_float(cls, weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> "QuantizedWeight":
        """Round-to-nearest quantization of a float weight [out, in] (or any ≥1-D tensor: leading dims are rows)."""
        w2d = as_2d(weight, name)
        check_finite(w2d, name)
        qw = cls(spec, (int(w2d.shape[0]), int(w2d.shape[1])), codecs.encode(w2d, spec, name))
        qw._check_scales(name)
        return qw

    @classmethod
    def from_qparams(cls, weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor,
                     name: str = "weight") -> "QuantizedWeight":
        """Integer formats: store ``weight`` with scale/zero [R, G] chosen by an algorithm (GPTQ, AWQ, HQQ …)."""
        if spec.format != "int":
            raise ValueError("from_qparams is for integer formats")
        w2d = as_2d(weight, name)
        check_finite(w2d, name)
        qw = cls(spec, (int(w2d.shape[0]), int(w2d.shape[1])), codecs.encode_int(w2d, spec, scale, zero, name))
        qw._check_scales(name)
        return qw

    # ---- meaning ------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this stored weight stands for."""
        return codecs.decode(self.tensors, self.spec, self.shape, dtype)

    @property
    def scale(self) -> torch.Tensor | None:
        """First-level scales [R, G] as float32 (None for fp16/bf16)."""
        if not self.spec.has_scale:
            return None
        return codecs.decode_scale(self.tensors, self.spec, self.shape)

    @property
    def zero_point(self) -> torch.Tensor | None:
        """Integer zero-points [R, G] (all 0 for symmetric specs; None for non-int formats)."""
        if self.spec.format != "int":
            return None
        return codecs.decode_zero(self.tensors, self.spec, scale_shape(self.shape, self.spec))

    # ---- size ---------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (packed codes + scales + zero-points + double-quant metadata)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        """Where the stored tensors live."""
        return self.tensors["qdata"].device

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(self.spec, self.shape, {k: v.to(device) for k, v in self.tensors.items()})

    def _check_scales(self, name: str) -> None:
        scale = self.tensors.get("scale")
        if scale is not None and not torch.isfinite(scale).all():
            raise InvalidWeightError(f"{name}: weight magnitudes overflow {self.spec.scale_dtype} scales; "
                                     f"use scale_dtype='float32'")
        if self.spec.format == "fp16" and not torch.isfinite(self.tensors["qdata"]).all():
            raise InvalidWeightError(f"{name}: values overflow float16 (|x| > 65504); use bf16")

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.spec.describe()}, shape={self.shape}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, tensors={sorted(self.tensors)})")


def quantize_tensor(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """Quantize a tensor to ``spec`` by round-to-nearest (shorthand for :meth:`QuantizedWeight.from_float`)."""
    return QuantizedWeight.from_float(weight, spec, name)


_FINITE_CHUNK = 1 << 22


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf in ``tensor`` (integer tensors: always; float8 ones, which torch.isfinite does not take, are
    widened chunk by chunk)."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    wide = tensor.element_size() == 1
    return all(bool(torch.isfinite(chunk.float() if wide else chunk).all()) for chunk in flat.split(_FINITE_CHUNK))


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raise :class:`InvalidWeightError` naming ``name`` if ``weight`` holds NaN or Inf."""
    if not weight.is_floating_point():
        return
    # chunked: torch.isfinite on a whole embedding matrix would transiently cost ~2x its size
    flat = weight.reshape(-1)
    if all(torch.isfinite(chunk).all() for chunk in flat.split(_FINITE_CHUNK)):
        return
    bad = sum((~torch.isfinite(chunk)).sum().item() for chunk in flat.split(_FINITE_CHUNK))
    kinds = [kind for kind, test in (("NaN", torch.isnan), ("Inf", torch.isinf))
             if any(test(chunk).any() for chunk in flat.split(_FINITE_CHUNK))]
    raise InvalidWeightError(f"{name}: weight contains {'/'.join(kinds)} ({bad} of {weight.numel()} values); "
                             "refusing to quantize it")


def as_2d(weight: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` as a 2-D [rows, last dim] view, checking it is a non-empty float tensor."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise InvalidWeightError(f"{name}: expected a floating-point tensor, got "
                                 f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() == 0 or weight.numel() == 0:
        raise ShapeError(f"{name}: cannot quantize a tensor of shape {tuple(weight.shape)}")
    if weight.dim() == 1:
        return weight.reshape(1, -1)
    return weight.reshape(-1, weight.shape[-1])
