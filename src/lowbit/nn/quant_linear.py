"""QuantLinear: the inference module holding a QuantizedWeight (drop-in for nn.Linear / HF Conv1D)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.act import ActSpec
from lowbit.formats.spec import QuantSpec
from lowbit.kernels import dispatch
from lowbit.kernels.base import PreparedLinear
from lowbit.tensor import QuantizedWeight


class QuantLinear(nn.Module):
    """y = x·Wᵀ + b with W stored quantized.

    The stored tensors of the weight are this module's buffers (so ``state_dict()`` *is* the
    packed checkpoint: ``qdata``, ``scale``, …); ``bias`` stays a float parameter (frozen).
    The forward is differentiable w.r.t. the input, which is what training adapters through a
    quantized base (QLoRA) needs.

    With an ``act_spec`` the input is quantized too (W8A8; LLM.int8 when it has an
    ``outlier_threshold``). A static ``act_spec`` adds the calibrated buffers ``input_scale`` and
    ``input_zero`` (float32 [1]) to the state dict; dynamic ones compute scales from each input.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = True,
                 tensors: dict[str, torch.Tensor] | None = None, act_spec: ActSpec | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.act_spec = act_spec
        self._tensor_names: list[str] = []
        self._prepared: PreparedLinear | None = None  # kernel-layout copy of the weight (not in state_dict)
        if tensors is not None:
            self._set_tensors(tensors)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        if act_spec is not None and not act_spec.dynamic:
            self.register_buffer("input_scale", torch.ones(1))
            self.register_buffer("input_zero", torch.zeros(1))

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None, *,
                    act_spec: ActSpec | None = None, input_scale: torch.Tensor | None = None,
                    input_zero: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap a stored weight; a static ``act_spec`` needs its calibrated ``input_scale`` (and, when
        asymmetric, ``input_zero``), float [1]."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, weight.spec, bias=bias is not None, tensors=weight.tensors,
                     act_spec=act_spec)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        if act_spec is not None and not act_spec.dynamic:
            if input_scale is None:
                raise ValueError("a static act_spec needs the calibrated input_scale")
            module.set_input_qparams(input_scale, input_zero if input_zero is not None else torch.zeros(1))
        return module

    @classmethod
    def from_float(cls, linear: nn.Module, spec: QuantSpec, name: str = "weight", *,
                   act_spec: ActSpec | None = None, input_scale: torch.Tensor | None = None,
                   input_zero: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (weight [out, in]) or transformers ``Conv1D`` (weight [in, out])."""
        weight = linear.weight.detach()
        if _is_conv1d(linear):
            weight = weight.t()
        qw = QuantizedWeight.from_float(weight, spec, name)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_weight(qw, bias, act_spec=act_spec, input_scale=input_scale, input_zero=input_zero)

    def set_input_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store calibrated static activation qparams (float [1] each)."""
        if self.act_spec is None or self.act_spec.dynamic:
            raise ValueError("input qparams belong to layers with a static act_spec")
        device = scale.device if self.input_scale.is_meta else self.input_scale.device
        self.input_scale = scale.detach().float().reshape(1).to(device)
        self.input_zero = zero.detach().float().reshape(1).to(device)

    def _set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._prepared = None
        for name in self._tensor_names:
            delattr(self, name)
        self._tensor_names = sorted(tensors)
        for name, value in tensors.items():
            self.register_buffer(name, value)

    @property
    def weight(self) -> QuantizedWeight:
        """A view of the stored weight (shares this module's buffers)."""
        view = QuantizedWeight(self.spec, (self.out_features, self.in_features),
                             {name: getattr(self, name) for name in self._tensor_names})
        # transformers' weight init after from_pretrained (e.g. GPT-2's scaled init of ``c_proj.weight``,
        # reached through the parent module) skips tensors carrying this flag; a packed weight is never
        # re-initialized
        view._is_hf_initialized = True  # type: ignore[attr-defined]
        return view

    # ---- kernels ------------------------------------------------------------------------
    def prepare_kernel(self) -> PreparedLinear:
        """Select the weight-only kernel for the device the weight is on and repack the weight for it.

        Done once and cached; moving the module (``.to()``) or loading a state dict drops the cache.
        """
        device = self.qdata.device
        if self._prepared is None or self._prepared.weight.tensors["qdata"].device != device:
            self._prepared = dispatch.prepare_weight(self.weight, device)
        return self._prepared

    def reset_kernel(self) -> None:
        """Forget the prepared kernel state (the next forward selects and repacks again)."""
        self._prepared = None

    @property
    def kernel_name(self) -> str:
        """The weight-only kernel family this layer runs with (``act:…`` for activation-quantized layers)."""
        if self.act_spec is not None:
            kernel = dispatch.linear_kernel(self.weight, self.qdata.device, self.act_spec)
            return f"act:{getattr(kernel, '__module__', '?')}.{getattr(kernel, '__name__', '?')}"
        return self.prepare_kernel().kernel.name

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``.to()``/``.cuda()``/``.half()``: the stored weight moves between devices but keeps its storage dtypes
        (fp16 scales cast to bf16 and back would lose bits the format promises to keep); bias and input
        qparams follow the module dtype as usual."""
        self._prepared = None  # the buffers are replaced: repack for the new ones
        order = list(self._buffers)
        stored = {name: self._buffers.pop(name) for name in self._tensor_names if name in self._buffers}
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, tensor in stored.items():
                if tensor is not None:
                    device = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
                    stored[name] = tensor.to(device)
            buffers = {name: stored[name] if name in stored else self._buffers[name] for name in order}
            self._buffers.clear()
            self._buffers.update(buffers)
        return result

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._prepared = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # like F.linear under autocast: compute in its dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self.act_spec is None:
            prepared = self._prepared
            if prepared is None:
                prepared = self.prepare_kernel()
            return prepared(x, self.bias)
        qw = self.weight
        scale, zero = getattr(self, "input_scale", None), getattr(self, "input_zero", None)
        return dispatch.linear_kernel(qw, x.device, self.act_spec)(x, qw, self.bias, self.act_spec, scale, zero)

    def dequantize(self) -> nn.Linear:
        """A float nn.Linear with the dequantized weight (activation quantization is dropped)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, spec={self.spec.describe()}"
                + ("" if self.act_spec is None else f", act={self.act_spec.describe()}"))


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight [in, out], forward x @ W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
