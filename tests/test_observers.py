"""Activation observers: the ranges and qparams they choose on known data, and their error handling."""

import pytest
import torch

from lowbit.errors import InvalidWeightError, LowbitError
from lowbit.formats.act import ActSpec
from lowbit.nn.observers import (EMAObserver, MinMaxObserver, MSEObserver, PercentileObserver, make_observer,
                                 qparams_from_range)


def test_minmax_symmetric_and_asymmetric_qparams() -> None:
    obs = MinMaxObserver("layer")
    obs.observe(torch.tensor([[-1.0, 0.5]]))
    obs.observe(torch.tensor([3.0, 0.0]))
    scale, zero = obs.qparams(8, symmetric=True)
    assert scale.shape == zero.shape == (1,) and scale.dtype == torch.float32
    assert torch.allclose(scale, torch.tensor([3.0 / 127])) and zero.item() == 0
    scale, zero = obs.qparams(8, symmetric=False)
    assert torch.allclose(scale, torch.tensor([4.0 / 255])) and zero.item() == 64  # round(1 / (4/255)) = 64


def test_range_always_contains_zero() -> None:
    scale, zero = qparams_from_range(2.0, 4.0, 8, symmetric=False)  # all-positive data: lo is taken as 0
    assert torch.allclose(scale, torch.tensor([4.0 / 255])) and zero.item() == 0


def test_ema_moves_towards_each_batch() -> None:
    obs = EMAObserver("layer", momentum=0.5)
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.observe(torch.tensor([-3.0, 3.0]))
    assert (obs.min, obs.max) == (-2.0, 2.0)
    assert torch.allclose(obs.qparams(8, True)[0], torch.tensor([2.0 / 127]))


def test_percentile_ignores_rare_outliers() -> None:
    x = torch.linspace(-1, 1, 20001)
    x[7] = 1000.0
    obs = PercentileObserver("layer", percentile=99.0)
    obs.observe(x)
    scale, _ = obs.qparams(8, True)
    assert abs(scale.item() * 127 - 0.99) < 0.01  # the 99th percentile of |x|, not the outlier
    lo_hi = PercentileObserver("layer", percentile=99.0)
    lo_hi.observe(x)
    scale, zero = lo_hi.qparams(8, False)
    assert abs(scale.item() * 255 - 1.96) < 0.02  # 1st to 99th percentile: [-0.98, 0.98]


def test_percentile_subsample_is_bounded_and_weighted_by_batch_size() -> None:
    obs = PercentileObserver("layer", max_samples=1000)
    obs.observe(torch.zeros(1000))
    obs.observe(torch.ones(100_000))
    assert obs.sample.numel() == 1000 and obs.seen == 101_000
    assert abs(obs.sample.mean().item() - 100_000 / 101_000) < 0.03
    big = PercentileObserver("layer", percentile=90.0, max_samples=2000)
    for seed in range(5):
        big.observe(torch.rand(50_000, generator=torch.Generator().manual_seed(seed)))
    assert abs(big.qparams(8, True)[0].item() * 127 - 0.9) < 0.03


def test_mse_trades_clipping_against_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g)
    x[0] = 200.0
    obs = MSEObserver("layer")
    obs.observe(x)
    scale, zero = obs.qparams(8, True)
    # one value in 20,000 at 200: the MSE optimum clips it to ~0.9 of the range, whatever its size
    assert 0.8 * 200 < scale.item() * 127 < 0.95 * 200

    def quant_mse(scale: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> float:
        lo, hi = (-128, 127) if symmetric else (0, 255)
        q = torch.clamp(torch.round(x / scale + zero), lo, hi)
        return ((q - zero) * scale - x).pow(2).mean().item()

    minmax = MinMaxObserver("layer")
    minmax.observe(x)
    for symmetric in (True, False):
        assert quant_mse(*obs.qparams(8, symmetric), symmetric) < quant_mse(*minmax.qparams(8, symmetric), symmetric)
    uniform = MSEObserver("layer")
    uniform.observe(torch.linspace(-1, 1, 10_001))
    assert uniform.qparams(8, True)[0].item() * 127 > 0.95


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cls", [MinMaxObserver, EMAObserver, PercentileObserver, MSEObserver])
def test_nan_inf_activations_name_the_layer(cls: type, bad: float) -> None:
    obs = cls("model.layers.3.mlp.down_proj")
    with pytest.raises(InvalidWeightError, match=r"model\.layers\.3\.mlp\.down_proj: activations contain NaN/Inf"):
        obs.observe(torch.tensor([1.0, bad, 2.0]))


def test_qparams_without_observations_is_an_error() -> None:
    with pytest.raises(LowbitError, match="fc1: no activations observed"):
        MinMaxObserver("fc1").qparams(8, True)


@pytest.mark.parametrize("observer, cls", [("minmax", MinMaxObserver), ("ema", EMAObserver),
                                           ("percentile", PercentileObserver), ("mse", MSEObserver)])
def test_make_observer_follows_the_spec(observer: str, cls: type) -> None:
    obs = make_observer(ActSpec.static(observer, percentile=99.5, ema_momentum=0.25), "fc")
    assert type(obs) is cls and obs.name == "fc"
    assert getattr(obs, "percentile", 99.5) == 99.5 and getattr(obs, "momentum", 0.25) == 0.25
