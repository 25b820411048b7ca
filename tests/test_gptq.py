"""GPTQ: lower layer-output error than RTN, act-order with static groups, dampening, errors."""

import warnings

import pytest
import torch

from lowbit import QuantSpec, quantize_tensor
from lowbit.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from lowbit.errors import InvalidSpecError


def _data(k: int = 128, n: int = 64, rows: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix  # correlated inputs: what makes GPTQ win
    w = torch.randn(n, k, generator=g) * 0.05
    acc = HessianAccumulator(k)
    for chunk in x.split(256):
        acc.add_batch(chunk)
    return x, w, acc.hessian


def _out_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return ((x @ (w - q).t()) ** 2).mean().item()


def test_hessian_is_mean_outer_product() -> None:
    x = torch.randn(100, 8)
    acc = HessianAccumulator(8)
    acc.add_batch(x[:30])
    acc.add_batch(x[30:].reshape(7, 10, 8))
    assert torch.allclose(acc.hessian, 2 * x.t() @ x / 100, atol=1e-5)


@pytest.mark.parametrize("spec", [QuantSpec.int_(4, 32, symmetric=False), QuantSpec.int_(3, 64),
                                  QuantSpec.int_(2, 32, symmetric=False), QuantSpec.int_(4, None)],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(spec: QuantSpec, act_order: bool) -> None:
    x, w, h = _data()
    rtn = quantize_tensor(w, spec).dequantize()
    gq = gptq_quantize(w, h, spec, GPTQConfig(act_order=act_order, block_size=32))
    assert gq.spec == spec and gq.shape == w.shape
    assert _out_err(x, w, gq.dequantize()) < 0.75 * _out_err(x, w, rtn)


def test_act_order_needs_no_runtime_permutation() -> None:
    # static groups: every stored group's scale covers the *original* columns of that group
    x, w, h = _data()
    spec = QuantSpec.int_(4, 32, symmetric=False)
    gq = gptq_quantize(w, h, spec, GPTQConfig(act_order=True))
    deq = gq.dequantize()
    scale, zero = gq.scale, gq.zero_point
    codes = torch.round(deq.reshape(64, 4, 32) / scale.unsqueeze(-1) + zero.unsqueeze(-1))
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.allclose((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1), deq.reshape(64, 4, 32), atol=1e-6)


def test_dead_inputs_and_singular_hessian() -> None:
    x, w, _ = _data(k=64, rows=16)  # rows < k: H is singular
    x[:, 5] = 0
    acc = HessianAccumulator(64)
    acc.add_batch(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gq = gptq_quantize(w[:, :64], acc.hessian, QuantSpec.int_(4, 32), GPTQConfig(damp=1e-9))
    assert torch.isfinite(gq.dequantize()).all()
    assert torch.equal(gq.dequantize()[:, 5], torch.zeros(64))  # a column no input ever reaches is zeroed


def test_damp_is_raised_with_a_warning_when_cholesky_fails() -> None:
    h = -torch.eye(16)  # not positive definite at any small dampening
    w = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="retrying with damp"):
        with pytest.raises(torch.linalg.LinAlgError):
            gptq_quantize(w, h, QuantSpec.int_(4, 16), GPTQConfig(damp=0.01, max_damp_retries=2), name="layer")


def test_gptq_rejects_non_int_formats() -> None:
    with pytest.raises(InvalidSpecError, match="layer.q"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), QuantSpec.nf4(64), name="layer.q")


def test_nan_activations_are_reported() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(FloatingPointError):
        acc.add_batch(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
