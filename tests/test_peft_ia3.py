"""(IA)³: Hugging Face peft's files both ways (tiny Llama, MiniLM), merging, training, quantized bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from conftest import base_model, train_steps
from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft import apply_adapter, load_adapter, save_adapter
from lowbit.peft.base import adapter_layers
from lowbit.peft.ia3 import IA3Adapter, IA3Config
from lowbit.peft.merge import merge, unmerge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
             task_type="CAUSAL_LM")
GPT2 = dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True,
            task_type="CAUSAL_LM")
BERT = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
            task_type="FEATURE_EXTRACTION")
# (model fixture, transformers class, config kwargs, output attribute compared)
CASES = [
    pytest.param("llama_dir", "AutoModelForCausalLM", LLAMA, "logits", id="llama"),
    pytest.param("minilm", "AutoModel", BERT, "last_hidden_state", id="minilm"),
    pytest.param("gpt2_dir", "AutoModelForCausalLM", GPT2, "logits", id="gpt2-conv1d"),
]


def hf_model(path: Path, cls: str) -> torch.nn.Module:
    return getattr(transformers, cls).from_pretrained(path).eval()


def inputs(vocab: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, min(vocab, 4096), (2, 12), generator=g),
            "attention_mask": torch.ones(2, 12, dtype=torch.long)}


@torch.no_grad()
def run(model: torch.nn.Module, attr: str) -> torch.Tensor:
    return getattr(model(**inputs()), attr)


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial vectors (a trained adapter), reproducible."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("fixture, cls, kwargs, attr", CASES)
def test_peft_file_loads_into_lowbit(request, tmp_path, fixture, cls, kwargs, attr):
    path = request.getfixturevalue(fixture)
    pm = peft.get_peft_model(hf_model(path, cls), peft.IA3Config(**kwargs)).eval()
    randomize(pm)
    pm.save_pretrained(tmp_path / "a")
    expected = run(pm, attr)

    model = lowbit.load(path).eval()
    load_adapter(model, tmp_path / "a")
    got = run(model, attr)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    with lowbit.peft.disable_adapters(model):
        assert not torch.allclose(run(model, attr), expected, atol=1e-3)


@pytest.mark.parametrize("fixture, cls, kwargs, attr", CASES)
def test_lowbit_file_loads_into_peft(request, tmp_path, fixture, cls, kwargs, attr):
    path = request.getfixturevalue(fixture)
    model = lowbit.load(path).eval()
    apply_adapter(model, IA3Config(**kwargs))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    expected = run(model, attr)

    pm = peft.PeftModel.from_pretrained(hf_model(path, cls), tmp_path / "a").eval()
    got = run(pm, attr)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert sorted(config["feedforward_modules"]) == sorted(kwargs["feedforward_modules"])


def test_vector_shapes_follow_feedforward(llama_dir):
    model = lowbit.load(llama_dir)
    apply_adapter(model, IA3Config(**LLAMA))
    layers = adapter_layers(model)
    down = layers["model.layers.0.mlp.down_proj"].adapters["default"]
    k = layers["model.layers.0.self_attn.k_proj"].adapters["default"]
    assert isinstance(down, IA3Adapter) and down.feedforward and tuple(down.ia3_l.shape) == (1, 256)
    assert not k.feedforward and tuple(k.ia3_l.shape) == (64, 1)
    assert torch.equal(k.ia3_l, torch.ones(64, 1))  # starts as the base


def test_default_targets_are_peft_defaults(llama_dir):
    model = lowbit.load(llama_dir)
    config = IA3Config()
    apply_adapter(model, config)
    assert sorted(config.target_modules) == ["down_proj", "k_proj", "v_proj"]
    assert config.feedforward_modules == ["down_proj"]
    assert len(adapter_layers(model)) == 6


def test_merge_and_unmerge(gpt2_dir):
    """Conv1D bases, a bias on every layer (scaled by output vectors), both vector kinds."""
    model = lowbit.load(gpt2_dir).eval()
    apply_adapter(model, IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]))
    randomize(model)
    base = model.transformer.h[0].attn.c_attn.base_layer.weight.detach().clone()
    adapted = run(model, "logits")
    merge(model)
    assert torch.allclose(run(model, "logits"), adapted, atol=1e-4, rtol=1e-5)
    unmerge(model)
    assert torch.equal(model.transformer.h[0].attn.c_attn.base_layer.weight, base)
    assert torch.allclose(run(model, "logits"), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
def test_trains(llama_dir, quantized):
    model = base_model(llama_dir, quantized)
    apply_adapter(model, IA3Config(**LLAMA))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.shape[-1] == 1 or p.shape[0] == 1 for p in params)

    def check(params):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    losses = train_steps(model, inputs(seed=3)["input_ids"], lr=0.05, check=check)
    assert losses[-1] < losses[0]


def test_quantized_base_merge(llama_dir):
    model = lowbit.quantize(lowbit.load(llama_dir), lowbit.QuantSpec.int_(4, 32, symmetric=False)).eval()
    apply_adapter(model, IA3Config(**LLAMA))
    randomize(model)
    adapted = run(model, "logits")
    merge(model, merge_dtype="float32")
    assert torch.allclose(run(model, "logits"), adapted, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "subset of target_modules"),
    (dict(target_modules=["k_proj"], init_ia3_weights="yes"), "init_ia3_weights"),
    (dict(target_modules=7), "target_modules"),
    (dict(target_modules=["k_proj"], task_type="NOPE"), "task_type"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(InvalidSpecError, match=match):
        IA3Config(**kwargs)


def test_unknown_model_type_needs_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(InvalidSpecError, match="target_modules is required"):
        apply_adapter(model, IA3Config())


def test_wrong_shapes_in_file(llama_dir, tmp_path):
    pm = peft.get_peft_model(hf_model(llama_dir, "AutoModelForCausalLM"),
                             peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    pm.save_pretrained(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    data["feedforward_modules"] = []  # the file's vectors now have the wrong orientation for down_proj
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(data))
    model = lowbit.load(llama_dir)
    with pytest.raises(LowbitError, match="down_proj.*shape"):
        load_adapter(model, tmp_path / "a")
