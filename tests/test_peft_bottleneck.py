"""Bottleneck adapters (Houlsby / Pfeiffer): placement per architecture, identity start, save/load,
training on float and quantized bases, no merging."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from conftest import base_model, train_steps
from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft import apply_adapter, disable_adapters, load_adapter, read_adapter_config, save_adapter
from lowbit.peft.base import adapter_layers
from lowbit.peft.bottleneck import BottleneckAdapter, BottleneckConfig
from lowbit.peft.merge import merge


def ids(seed: int = 0, vocab: int = 4096) -> torch.Tensor:
    return torch.randint(5, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model: torch.nn.Module) -> torch.Tensor:
    out = model(input_ids=ids())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "adapter_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


# (model fixture, placement, expected adapted layers as (count, leaf-name suffixes))
PLACEMENTS = [
    ("llama_dir", "houlsby", 4, {"self_attn.o_proj", "mlp.down_proj"}),
    ("llama_dir", "pfeiffer", 2, {"mlp.down_proj"}),
    ("gpt2_dir", "houlsby", 4, {"attn.c_proj", "mlp.c_proj"}),
    ("gpt2_dir", "pfeiffer", 2, {"mlp.c_proj"}),
    ("minilm", "houlsby", 12, {"attention.output.dense", "output.dense"}),
    ("minilm", "pfeiffer", 6, {"output.dense"}),
]


@pytest.mark.parametrize("fixture, placement, count, suffixes", PLACEMENTS)
def test_placement(request, fixture, placement, count, suffixes):
    model = lowbit.load(request.getfixturevalue(fixture)).eval()
    before = output(model)
    apply_adapter(model, BottleneckConfig(placement=placement, task_type=None))
    layers = adapter_layers(model)
    assert len(layers) == count
    for name in layers:
        assert any(name.endswith("." + s) for s in suffixes), name
        if placement == "pfeiffer":
            assert ".attention." not in name and "attn" not in name
    assert torch.allclose(output(model), before, atol=1e-6, rtol=0)  # up = 0: starts as the base


def test_bottleneck_size_and_keys(llama_dir, tmp_path):
    model = lowbit.load(llama_dir)
    apply_adapter(model, BottleneckConfig(reduction_factor=32, non_linearity="gelu"))
    adapter = adapter_layers(model)["model.layers.0.mlp.down_proj"].adapters["default"]
    assert isinstance(adapter, BottleneckAdapter)
    assert tuple(adapter.adapter_down.weight.shape) == (4, 128) and tuple(adapter.adapter_up.weight.shape) == (128, 4)
    assert torch.count_nonzero(adapter.adapter_up.weight) == 0
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    prefix = "base_model.model.model.layers.0.mlp.down_proj."
    assert {prefix + s for s in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight",
                                 "adapter_up.bias")} <= keys
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LOWBIT_BOTTLENECK" and data["reduction_factor"] == 32


@pytest.mark.parametrize("fixture, placement, act", [("llama_dir", "houlsby", "relu"), ("gpt2_dir", "pfeiffer", "silu"),
                                                     ("minilm", "houlsby", "gelu")])
def test_save_load_round_trip(request, tmp_path, fixture, placement, act):
    path = request.getfixturevalue(fixture)
    model = lowbit.load(path).eval()
    config = BottleneckConfig(placement=placement, non_linearity=act, reduction_factor=8)
    apply_adapter(model, config)
    randomize(model)
    expected = output(model)
    with disable_adapters(model):
        assert not torch.allclose(output(model), expected, atol=1e-4)
    save_adapter(model, tmp_path / "a")
    assert read_adapter_config(tmp_path / "a") == config

    again = lowbit.load(path).eval()
    load_adapter(again, tmp_path / "a")
    assert torch.allclose(output(again), expected, atol=1e-6, rtol=0)


def test_merge_is_refused(llama_dir):
    model = lowbit.load(llama_dir)
    apply_adapter(model, BottleneckConfig(placement="pfeiffer"))
    with pytest.raises(LowbitError, match="down_proj.*cannot be merged"):
        merge(model)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
def test_trains(llama_dir, quantized):
    model = base_model(llama_dir, quantized)
    apply_adapter(model, BottleneckConfig(reduction_factor=8))
    assert len([p for p in model.parameters() if p.requires_grad]) == 4 * 4

    def check(params):
        assert all(p.grad is not None for p in params)
    losses = train_steps(model, ids(3), lr=1e-2, check=check)
    assert losses[-1] < losses[0]


def test_explicit_targets(llama_dir):
    model = lowbit.load(llama_dir)
    apply_adapter(model, BottleneckConfig(target_modules=["v_proj"]))
    assert sorted(adapter_layers(model)) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_unknown_layout_needs_targets():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(InvalidSpecError, match="no known layout"):
        apply_adapter(model, BottleneckConfig())


@pytest.mark.parametrize("kwargs, match", [
    (dict(placement="middle"), "placement"),
    (dict(reduction_factor=0), "reduction_factor"),
    (dict(reduction_factor=2.5), "reduction_factor"),
    (dict(non_linearity="tanh"), "non_linearity"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(InvalidSpecError, match=match):
        BottleneckConfig(**kwargs)
