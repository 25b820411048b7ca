"""QuantLinear: the inference module holding a QuantizedWeight (drop-in for nn.Linear / HF Conv1D)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.spec import QuantSpec
from lowbit.kernels.dispatch import linear_kernel
from lowbit.tensor import QuantizedWeight


class QuantLinear(nn.Module):
    """y = x·Wᵀ + b with W stored quantized.

    The stored tensors of the weight are this module's buffers (so ``state_dict()`` *is* the
    packed checkpoint: ``qdata``, ``scale``, …); ``bias`` stays a float parameter (frozen).
    The forward is differentiable w.r.t. the input, which is what training adapters through a
    quantized base (QLoRA) needs.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self._tensor_names: list[str] = []
        if tensors is not None:
            self._set_tensors(tensors)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, weight.spec, bias=bias is not None, tensors=weight.tensors)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return module

    @classmethod
    def from_float(cls, linear: nn.Module, spec: QuantSpec, name: str = "weight") -> "QuantLinear":
        """Quantize an ``nn.Linear`` (weight [out, in]) or transformers ``Conv1D`` (weight [in, out])."""
        weight = linear.weight.detach()
        if _is_conv1d(linear):
            weight = weight.t()
        qw = QuantizedWeight.from_float(weight, spec, name)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_weight(qw, bias)

    def _set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self._tensor_names:
            delattr(self, name)
        self._tensor_names = sorted(tensors)
        for name, value in tensors.items():
            self.register_buffer(name, value)

    @property
    def weight(self) -> QuantizedWeight:
        """A view of the stored weight (shares this module's buffers)."""
        return QuantizedWeight(self.spec, (self.out_features, self.in_features),
                               {name: getattr(self, name) for name in self._tensor_names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.weight
        return linear_kernel(qw, x.device)(x, qw, self.bias)

    def dequantize(self) -> nn.Linear:
        """A float nn.Linear with the dequantized weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, spec={self.spec.describe()}")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight [in, out], forward x @ W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
