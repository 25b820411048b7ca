"""Weight-only kernel dispatch: selection, one-time repacking, cache invalidation, autograd."""

from __future__ import annotations

import torch

from lowbit.formats.spec import QuantSpec
from lowbit.kernels import dispatch
from lowbit.kernels.base import WeightKernel
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import QuantizedWeight


def _layer(spec: QuantSpec = QuantSpec.int_(4, 32)) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g))
    return QuantLinear.from_float(lin, spec)


def _counting_kernel(calls: dict[str, int], priority: int = 100) -> WeightKernel:
    def prepare(weight: QuantizedWeight) -> torch.Tensor:
        calls["prepare"] += 1
        return weight.dequantize()

    def apply(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls["apply"] += 1
        return torch.nn.functional.linear(x, w.to(x.dtype), bias)

    return WeightKernel("counting-test", ("cpu",), lambda w: w.spec.bits == 4, prepare, apply, priority=priority)


def test_prepare_once_and_invalidate() -> None:
    calls = {"prepare": 0, "apply": 0}
    dispatch.register_weight_kernel(_counting_kernel(calls))
    try:
        layer = _layer()
        x = torch.randn(3, 64)
        ref = torch.nn.functional.linear(x, layer.weight.dequantize(), layer.bias)
        for _ in range(3):
            assert torch.allclose(layer(x), ref, atol=1e-5)
        assert calls == {"prepare": 1, "apply": 3}
        assert layer.kernel_name == "counting-test"
        layer.to(torch.float32)  # any _apply drops the cache
        layer(x)
        assert calls["prepare"] == 2
        layer.load_state_dict(layer.state_dict())
        layer(x)
        assert calls["prepare"] == 3
        with dispatch.force_kernel("reference"):
            layer.reset_kernel()
            assert layer.kernel_name == "reference"
        # a weight the test kernel does not support goes to another CPU family (or the reference)
        assert _layer(QuantSpec.int_(8, None)).kernel_name != "counting-test"
    finally:
        dispatch._WEIGHT_KERNELS[:] = [k for k in dispatch._WEIGHT_KERNELS if k.name != "counting-test"]


def test_backward_through_fast_kernel_uses_dequantized_weight() -> None:
    calls = {"prepare": 0, "apply": 0}
    dispatch.register_weight_kernel(_counting_kernel(calls))
    try:
        layer = _layer()
        x = torch.randn(5, 64, requires_grad=True)
        layer(x).square().sum().backward()
        x2 = x.detach().clone().requires_grad_(True)
        torch.nn.functional.linear(x2, layer.weight.dequantize(), layer.bias).square().sum().backward()
        assert calls["apply"] == 1
        assert torch.allclose(x.grad, x2.grad, atol=1e-4)
    finally:
        dispatch._WEIGHT_KERNELS[:] = [k for k in dispatch._WEIGHT_KERNELS if k.name != "counting-test"]


def test_failing_prepare_falls_back_with_warning() -> None:
    def bad_prepare(weight: QuantizedWeight) -> None:
        raise RuntimeError("boom")

    dispatch.register_weight_kernel(WeightKernel("broken-test", ("cpu",), lambda w: True, bad_prepare,
                                                 lambda x, s, b: x, priority=1000))
    try:
        layer = _layer()
        import pytest

        with pytest.warns(UserWarning, match="broken-test"):
            y = layer(torch.randn(2, 64))
        assert layer.kernel_name == "reference"
        assert y.shape == (2, 24)
    finally:
        dispatch._WEIGHT_KERNELS[:] = [k for k in dispatch._WEIGHT_KERNELS if k.name != "broken-test"]
