"""NaN/Inf produced inside the model (a kernel, a corrupt scale): a NumericalError naming the layer (issue 21)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import NumericalError
from lowbit.eval.numerics import first_nonfinite_module
from lowbit.eval.perplexity import perplexity
from lowbit.formats.spec import QuantSpec
from lowbit.quantize import quantize

IDS = torch.randint(0, 4096, (300,), generator=torch.Generator().manual_seed(0))


def _model():
    return quantize(lowbit.load("builtin:tiny-lm"), QuantSpec(bits=4, group_size=128))


def test_a_kernel_that_returns_nan_is_named() -> None:
    model = _model()
    layer = model.model.layers[2].mlp.down_proj
    real = layer.forward
    layer.forward = lambda x: real(x) * torch.nan  # type: ignore[method-assign]
    with pytest.raises(NumericalError, match=r"model\.layers\.2\.mlp\.down_proj \(QuantLinear int4-g128"):
        perplexity(model, IDS, seq_len=64)


def test_an_infinite_scale_is_named() -> None:
    model = _model()
    layer = model.model.layers[1].self_attn.v_proj
    layer.scale[0, 0] = torch.inf
    layer.reset_kernel()
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        perplexity(model, IDS, seq_len=64)
    assert first_nonfinite_module(_model(), lambda: None) is None


def test_finite_models_pay_one_check() -> None:
    model = _model()
    assert perplexity(model, IDS, seq_len=64).ppl > 1


def test_packed_weights_keep_their_storage_dtypes_through_module_casts() -> None:
    """model.to(bfloat16) / .half() / .float() move a stored weight but never re-type it: fp16 scales cast to bf16
    and back would lose bits (and a packed uint8 tensor must never become a float)."""
    model = _model()
    layer = model.model.layers[0].mlp.down_proj
    before = {k: v.clone() for k, v in layer.weight.tensors.items()}
    order = list(layer.state_dict())
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        after = layer.weight.tensors
        assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
        assert all(torch.equal(after[k], before[k]) for k in before)
    assert layer.bias is None or layer.bias.dtype == torch.float32
    assert list(layer.state_dict()) == order  # the stored order is kept too
