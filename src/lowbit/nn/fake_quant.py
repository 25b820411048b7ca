"""FakeQuantLinear: quantization-aware training of an integer-format linear layer, and its exact conversion.

The forward computes ``y = x · Ŵᵀ + b`` with the weight as lowbit will store it:

    s  = the scale after its storage round trip (fp16 cast / double quantization)   [R, G]
    z  = the zero-point rounded to an integer in [0, 2^b − 1] (asymmetric; 0 when symmetric)
    q  = clamp(round(W/s + z), qmin, qmax)      Ŵ = (q − z) · s

Rounding and the storage round trips pass gradients straight through (STE); the scale gets LSQ's STE
gradient (Esser et al. 2020) but is learned as a log-multiplier of its initial value, s = s₀·exp(u), so an
optimizer step changes it relatively (Adam's step is ~lr in parameter units: on a raw scale of 1e-3 that
would overshoot) and it stays positive; the zero-point is learned as a float and used rounded. Weights
outside the clamp range get no gradient from the rounding path, as in LSQ.

Because the forward already uses the stored scale and the integer zero-point, :meth:`convert` stores
exactly Ŵ: the packed :class:`~lowbit.nn.QuantLinear` dequantizes to the same floats, bit for bit (the
QAT-vs-convert mismatch torchao users met, ao#2986, cannot happen). Ranges are initialised from a
post-training result (:meth:`from_quantized`: RTN, GPTQ …), so step 0 *is* that model.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats import codecs
from lowbit.formats import primitives as P
from lowbit.formats.spec import QuantSpec
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import QuantizedWeight


def check_spec(spec: QuantSpec) -> None:
    """QAT covers int formats with per-channel or per-group scales and integer zero-points."""
    if spec.format != "int" or spec.granularity == "tensor" or spec.float_zero or spec.double_quant:
        # double quantization re-quantizes all scales together, so storing them twice would not be exact
        from lowbit.errors import InvalidSpecError

        raise InvalidSpecError(f"QAT covers int formats with per-channel or per-group scales (not double-"
                               f"quantized) and integer zero-points, not {spec.describe()}")


def _ste(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` in the forward, the identity's gradient to ``value`` in the backward."""
    return value + (target - value).detach()


class FakeQuantLinear(nn.Module):
    """A trainable float weight [out, in] seen through an integer ``spec`` (per channel or per group)."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None = None, *, learn_scale: bool = True, learn_zero: bool = True) -> None:
        super().__init__()
        check_spec(spec)
        self.spec = spec
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.register_buffer("scale_init", scale.detach().float().clone().abs().clamp(min=1e-8))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale_init), requires_grad=learn_scale)
        self.zero = nn.Parameter(zero.detach().float().clone(), requires_grad=learn_zero and not spec.symmetric)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.qmin, self.qmax = P.int_range(spec.bits, spec.symmetric)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, weight: torch.Tensor | None = None,
                       **kwargs: bool) -> "FakeQuantLinear":
        """Start from a stored weight: its scale and zero-point, and (default) its dequantized values as the float
        weight, so that the first forward equals the quantized model's."""
        w = qw.dequantize(torch.float32) if weight is None else weight
        scale, zero = qw.scale, qw.zero_point
        assert scale is not None and zero is not None
        return cls(w, qw.spec, scale, zero, bias, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec, name: str = "weight", **kwargs: bool) -> "FakeQuantLinear":
        """Round-to-nearest ranges of a float ``nn.Linear`` (the float weight kept as the starting point)."""
        w = linear.weight.detach().float()
        scale, zero = codecs.int_qparams(w, spec, name)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(w, spec, scale, zero, bias, **kwargs)

    # ---- the simulated weight -------------------------------------------------------------------
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale as stored, integer zero-point) [R, G], differentiable through STE."""
        s = self.scale_init * torch.exp(self.log_scale)
        s = _ste(s, codecs.stored_scale(s.detach(), self.spec))
        if self.spec.symmetric:
            return s, torch.zeros_like(s)
        z = _ste(self.zero, self.zero.detach().round().clamp(0, self.qmax))
        return s, z

    def quantized_weight(self) -> torch.Tensor:
        """Ŵ [out, in]: what the converted layer stores (float32)."""
        s, z = self.qparams()
        x = P.grouped(self.weight, self.spec)
        v = x / s.unsqueeze(-1) + z.unsqueeze(-1)
        q = torch.clamp(_ste(v, torch.round(v.detach())), self.qmin, self.qmax)
        return ((q - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return torch.nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # ---- conversion -----------------------------------------------------------------------------
    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        s, z = self.qparams()
        return QuantizedWeight.from_qparams(self.quantized_weight(), self.spec, s.detach(), z.detach())

    @torch.no_grad()
    def convert(self) -> QuantLinear:
        """The packed layer computing exactly this layer's forward."""
        return QuantLinear.from_weight(self.to_quantized(), self.bias).to(self.weight.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"spec={self.spec.describe()}")
