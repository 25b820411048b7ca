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

from typing import Any

import torch
from torch import nn

from lowbit.formats import codebooks, codecs
from lowbit.formats import primitives as P
from lowbit.formats.act import ActSpec
from lowbit.formats.spec import QuantSpec
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import QuantizedWeight


def check_spec(spec: QuantSpec, act_spec: ActSpec | None = None) -> None:
    """QAT covers int formats (per-channel or per-group scales; zero-points integer or float — QA-LoRA folds its
    group-wise update into float zero-points) and the NF4/FP4 codebooks (per-block absmax), none double-quantized;
    activations dynamically quantized (per token or per tensor, no outlier decomposition)."""
    from lowbit.errors import InvalidSpecError

    if spec.format not in ("int", "nf4", "fp4") or spec.granularity == "tensor" or spec.double_quant:
        # double quantization re-quantizes all scales together, so storing them twice would not be exact
        raise InvalidSpecError(f"QAT covers int, nf4 and fp4 formats with per-channel or per-group scales (not "
                               f"double-quantized), not {spec.describe()}")
    if act_spec is not None and (not act_spec.dynamic or act_spec.outlier_threshold is not None):
        raise InvalidSpecError(f"QAT of activations covers dynamic specs without outlier columns, not "
                               f"{act_spec.describe()} (a static scale would have to be trained and calibrated)")


def _ste(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` in the forward, the identity's gradient to ``value`` in the backward."""
    return value + (target - value).detach()


class FakeQuantLinear(nn.Module):
    """A trainable float weight [out, in] seen through an integer ``spec`` (per channel or per group)."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None = None, *, learn_scale: bool = True, learn_zero: bool = True,
                 act_spec: ActSpec | None = None) -> None:
        super().__init__()
        check_spec(spec, act_spec)
        self.spec, self.act_spec = spec, act_spec
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.register_buffer("scale_init", scale.detach().float().clone().abs().clamp(min=1e-8))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale_init), requires_grad=learn_scale)
        self.zero = nn.Parameter(zero.detach().float().clone(), requires_grad=learn_zero and spec.has_zero)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.qmin, self.qmax = P.int_range(spec.bits, spec.symmetric) if spec.format == "int" else (0, 15)
        self.register_buffer("codes", None)  # freeze_codes(): the integer codes
        self.lora_A: nn.Parameter | None = None  # QA-LoRA (add_group_lora)
        self.lora_B: nn.Parameter | None = None
        self.lora_scaling = 1.0

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, weight: torch.Tensor | None = None,
                       spec: QuantSpec | None = None, **kwargs: Any) -> "FakeQuantLinear":
        """Start from a stored weight: its scale and zero-point, and (default) its dequantized values as the float
        weight, so that the first forward equals the quantized model's. ``spec``: train in another spec of the same
        grid (e.g. float zero-points for QA-LoRA)."""
        w = qw.dequantize(torch.float32) if weight is None else weight
        scale = qw.scale
        assert scale is not None
        zero = qw.zero_point if qw.spec.format == "int" else torch.zeros_like(scale)
        return cls(w, spec or qw.spec, scale, zero, bias, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec, name: str = "weight", **kwargs: Any) -> "FakeQuantLinear":
        """Round-to-nearest ranges of a float ``nn.Linear`` (the float weight kept as the starting point)."""
        w = linear.weight.detach().float()
        if spec.format == "int":
            scale, zero = codecs.int_qparams(w, spec, name)
        else:  # codebook formats: the block absmax, as stored
            scale = codecs.stored_scale(P.grouped(w, spec, name).abs().amax(-1), spec)
            zero = torch.zeros_like(scale)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(w, spec, scale, zero, bias, **kwargs)

    # ---- the simulated weight -------------------------------------------------------------------
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale as stored, integer zero-point) [R, G], differentiable through STE."""
        s = self.scale_init * torch.exp(self.log_scale)
        s = _ste(s, codecs.stored_scale(s.detach(), self.spec))
        if not self.spec.has_zero:
            return s, torch.zeros_like(s)
        if self.spec.float_zero:  # stored as a float: only its dtype round trip
            return s, _ste(self.zero, self.zero.detach().to(codecs.SCALE_TORCH_DTYPES[self.spec.zero_dtype]).float())
        z = _ste(self.zero, self.zero.detach().round().clamp(0, self.qmax))
        return s, z

    def quantized_weight(self) -> torch.Tensor:
        """Ŵ [out, in]: what the converted layer stores (float32)."""
        s, z = self.qparams()
        if self.spec.format != "int":
            return self._codebook_weight(s)
        if self.codes is not None:  # frozen integer codes: only scales, zero-points (and an adapter) move
            q = P.grouped(self.codes.float(), self.spec)
        else:
            x = P.grouped(self.weight, self.spec)
            v = x / s.unsqueeze(-1) + z.unsqueeze(-1)
            q = torch.clamp(_ste(v, torch.round(v.detach())), self.qmin, self.qmax)
        z_out = z if self.lora_A is None else self._zero_with_lora(s, z)
        return ((q - z_out.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(self.out_features, self.in_features)

    def _codebook_weight(self, s: torch.Tensor) -> torch.Tensor:
        """NF4/FP4: Ŵ = c[nearest code of W/s]·s, the rounding straight through, the scale LSQ-like."""
        book = codebooks.codebook(self.spec.format).to(self.weight.device)
        x = P.grouped(self.weight, self.spec)
        if self.codes is not None:
            c = book[P.grouped(self.codes.long(), self.spec)]
        else:
            y = x / s.unsqueeze(-1)
            nearest = book[P.quantize_codebook(x.detach(), s.detach(), book).long()]
            c = _ste(y.clamp(-1.0, 1.0), nearest)  # outside [-1, 1]: no gradient to the weight, as in LSQ
        return (c * s.unsqueeze(-1)).reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Fix the integer codes q at their current values: the weight stops training and a scale change
        rescales the codes instead of re-rounding the weight (QA-LoRA keeps the base model's codes; re-rounding a
        GPTQ weight under a moved scale throws away GPTQ's error compensation)."""
        s, z = self.qparams()
        if self.spec.format != "int":
            book = codebooks.codebook(self.spec.format).to(self.weight.device)
            codes = P.quantize_codebook(P.grouped(self.weight, self.spec), s, book)
            self.codes = codes.reshape(self.out_features, self.in_features)
            self.weight.requires_grad_(False)
            return
        v = P.grouped(self.weight, self.spec) / s.unsqueeze(-1) + z.unsqueeze(-1)
        codes = torch.clamp(torch.round(v), self.qmin, self.qmax).reshape(self.out_features, self.in_features)
        self.codes = codes.to(torch.int8 if self.qmin < 0 else torch.uint8)  # a registered buffer
        self.weight.requires_grad_(False)

    # ---- QA-LoRA: a group-wise low-rank update that lives in the zero-points --------------------
    def add_group_lora(self, rank: int, alpha: float | None = None, seed: int = 0) -> None:
        """Train ``Δ = B·A·alpha/rank`` [out, groups] added to every weight of a group (QA-LoRA, Xu et al. 2023):
        A sees the input summed over each group, so ``Δ`` is constant per (row, group) and folds exactly into the
        zero-point, ``(q − z)·s + Δ = (q − (z − Δ/s))·s`` — the merged model stays on the integer grid, no
        re-rounding. Needs group-wise scales and float zero-points (``zero_dtype``)."""
        from lowbit.errors import InvalidSpecError

        if self.spec.granularity != "group" or not self.spec.float_zero:
            raise InvalidSpecError(f"QA-LoRA needs group-wise scales and float zero-points (asymmetric, zero_dtype "
                                   f"float16/bfloat16/float32), not {self.spec.describe()}")
        if rank < 1:
            raise InvalidSpecError(f"LoRA rank must be ≥ 1, got {rank}")
        groups = self.in_features // int(self.spec.group_size)
        g = torch.Generator().manual_seed(seed)
        device = self.weight.device
        self.lora_A = nn.Parameter((torch.randn(rank, groups, generator=g) / groups ** 0.5).to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.lora_scaling = float(alpha if alpha is not None else rank) / rank

    def group_delta(self) -> torch.Tensor:
        """Δ [out, groups] of the group-wise adapter (zeros without one)."""
        if self.lora_A is None:
            return torch.zeros(self.scale_init.shape, device=self.weight.device)
        return (self.lora_B @ self.lora_A) * self.lora_scaling

    def _zero_with_lora(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z_new = z - self.group_delta() / s
        return _ste(z_new, z_new.detach().to(codecs.SCALE_TORCH_DTYPES[self.spec.zero_dtype]).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        bias = None if self.bias is None else self.bias
        if self.act_spec is not None:  # what the W·A kernel multiplies: the input's codes, rounding passed through
            from lowbit.kernels.reference import fake_quantize_activation

            x2d = x.reshape(-1, x.shape[-1]).float()
            xq = _ste(x2d, fake_quantize_activation(x2d.detach(), self.act_spec))
            return torch.nn.functional.linear(xq, w, bias).reshape(*x.shape[:-1], -1).to(x.dtype)
        return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    # ---- conversion -----------------------------------------------------------------------------
    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        s, z = self.qparams()
        if self.spec.format != "int":  # the learned absmax as stored, codes chosen on that grid
            stored = codecs.store_scale(s, self.spec)
            tensors = codecs.encode_on_grid(self.quantized_weight(), stored, self.spec)
            return QuantizedWeight(self.spec, (self.out_features, self.in_features), tensors)
        if self.lora_A is not None:  # the adapter is merged: it is part of the zero-point
            z = self._zero_with_lora(s, z)
        return QuantizedWeight.from_qparams(self.quantized_weight(), self.spec, s.detach(), z.detach())

    @torch.no_grad()
    def convert(self) -> QuantLinear:
        """The packed layer computing exactly this layer's forward."""
        return QuantLinear.from_weight(self.to_quantized(), self.bias, act_spec=self.act_spec).to(self.weight.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"spec={self.spec.describe()}" + ("" if self.act_spec is None else f", act={self.act_spec.describe()}"))
