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
