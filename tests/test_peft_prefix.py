"""Prefix tuning (lowbit.peft.prefix) against Hugging Face peft: forward, generation, files, training."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.errors import InvalidSpecError, ShapeError, UnsupportedModelError
from lowbit.peft import (adapter_state_dict, apply_adapter, delete_adapter, disable_adapters,
                         save_adapter)
from lowbit.peft.prefix import PrefixTuningConfig
from lowbit.peft.prompt import PromptTuningConfig, virtual_tokens

peft = pytest.importorskip("peft")
from prompt_learning_support import assert_files_both_ways, batch, pair  # noqa: E402
N = 3


pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("projection", [False, True])
def test_forward_equals_peft(llama_dir, projection):
    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    ref, model = pair(llama_dir, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **extra),
                      PrefixTuningConfig(num_virtual_tokens=N, **extra))
    encoder = model.lowbit_prompt_learning.encoders["default"]
    assert encoder.config.token_dim == 64 and encoder.config.num_attention_heads == 2  # GQA: 2 kv heads × 32
    inputs = batch()
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        want = ref(**inputs, labels=inputs["input_ids"])
        got = model(**inputs, labels=inputs["input_ids"])
        torch.testing.assert_close(model(**inputs, position_ids=positions).logits,
                                   ref(**inputs, position_ids=positions).logits, atol=1e-5, rtol=0)
    assert got.logits.shape == want.logits.shape == (2, 6, 4096)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter_state_dict(model)["prompt_embeddings"],
                               ref.get_prompt_embedding_to_save("default"))
    assert got.cache.get_seq_length() == N + 6  # the prefix went in through the cache
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    want_names = {n.replace("prompt_encoder.default", "lowbit_prompt_learning.encoders.default")
                  for n, p in ref.named_parameters() if p.requires_grad}
    assert names == want_names


def test_generation_equals_peft_forward(llama_dir):
    """model.generate and lowbit's Generator give the greedy tokens of peft's forward (peft's own
    generate drops the prefix with transformers 5.x: its cache goes in as the ignored past_key_values)."""
    from lowbit.generate import Generator

    ref, model = pair(llama_dir, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
                      PrefixTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        for m in (ref, model):  # a gentler prefix: varied tokens
            for p in m.parameters():
                if p.requires_grad:
                    p.mul_(0.2)
    inputs, steps = batch(pad=False), 5
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(steps):
            nxt = ref(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    assert out[:, -steps:].tolist() == ids[:, -steps:].tolist()
    assert virtual_tokens(model) == N
    gen = Generator(model, max_cache_len=6 + steps + N, compile=False)
    for _ in range(2):  # the static cache is reset and refilled with the prefix each time
        assert gen.generate(inputs["input_ids"][:1], steps).tokens == ids[0, -steps:].tolist()


@pytest.mark.parametrize("projection", [False, True])
def test_files_both_ways(llama_dir, tmp_path, projection):
    from safetensors.torch import load_file

    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if projection else {}
    ref, model = pair(llama_dir, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **extra),
                      PrefixTuningConfig(num_virtual_tokens=N, **extra), seed=4)
    inputs = batch()
    save_adapter(model, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeddings": (N, 2 * 2 * 64)}
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (data["token_dim"], data["num_attention_heads"], data["inference_mode"]) == (64, 2, True)
    assert_files_both_ways(model, ref, llama_dir, tmp_path, inputs)
    # a projected encoder that is given peft's flat prefix becomes that table (the MLP is not in files)
    if projection:
        encoder = model.lowbit_prompt_learning.encoders["default"]
        encoder.load_peft_tensor(tensors["prompt_embeddings"] * 2, "test")
        assert not encoder.projected and encoder.embedding.weight.shape == (N, 256)


def test_disable_delete_and_mixing_with_prompt(llama_dir):
    base = lowbit.load(llama_dir).eval()
    model = lowbit.load(llama_dir).eval()
    inputs = batch()
    with torch.no_grad():
        plain = base(**inputs).logits
        apply_adapter(model, PrefixTuningConfig(num_virtual_tokens=N), "prefix")
        with_prefix = model(**inputs).logits
        assert (with_prefix - plain).abs().max() > 1e-3
        with disable_adapters(model):
            torch.testing.assert_close(model(**inputs).logits, plain)
        apply_adapter(model, PromptTuningConfig(num_virtual_tokens=2), "prompt")  # now active instead
        assert model(**inputs).logits.shape[1] == 6 + 2
        delete_adapter(model, "prompt")
        delete_adapter(model, "prefix")
        torch.testing.assert_close(model(**inputs).logits, plain)
    assert not hasattr(model, "lowbit_prompt_learning")


def test_minilm_feature_extraction(minilm):
    import transformers

    loader = lambda path: transformers.AutoModel.from_pretrained(path).eval()  # noqa: E731
    ref, model = pair(minilm, peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=N),
                      PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=N), loader=loader)
    inputs = batch()
    inputs["input_ids"] = inputs["input_ids"] % 1000
    with torch.no_grad():
        want, got = ref(**inputs).last_hidden_state, model(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    seq_cls = transformers.AutoModelForSequenceClassification.from_pretrained(minilm)
    with pytest.raises(UnsupportedModelError, match="KV cache"):  # peft cannot either
        apply_adapter(seq_cls, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))


@pytest.mark.parametrize("projection", [False, True])
def test_training_on_quantized_base(llama_dir, projection):
    model = lowbit.load(llama_dir)
    lowbit.quantize(model, lowbit.QuantSpec.int_(4, 32, symmetric=False))
    extra = {"prefix_projection": True, "encoder_hidden_size": 32} if projection else {}
    torch.manual_seed(0)
    apply_adapter(model, PrefixTuningConfig(num_virtual_tokens=4, **extra))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(n.startswith("lowbit_prompt_learning.") for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    ids = torch.randint(0, 4096, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("kwargs, error, field", [
    ({"num_virtual_tokens": 0}, InvalidSpecError, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2, "init_weights": "ones"}, InvalidSpecError, "init_weights"),
    ({"num_virtual_tokens": 2, "encoder_hidden_size": 0}, InvalidSpecError, "encoder_hidden_size"),
    ({"num_virtual_tokens": 2, "num_transformer_submodules": 2}, UnsupportedModelError, "encoder-decoder"),
])
def test_config_errors(kwargs, error, field):
    with pytest.raises(error, match=field):
        PrefixTuningConfig(**kwargs)


def test_shape_mismatch_and_zero_init(llama_dir):
    with pytest.raises(ShapeError, match="token_dim is 128"):
        apply_adapter(lowbit.load(llama_dir), PrefixTuningConfig(num_virtual_tokens=2, token_dim=128))
    checkpointed = lowbit.load(llama_dir)
    checkpointed.gradient_checkpointing_enable()
    with pytest.raises(UnsupportedModelError, match="gradient checkpointing"):
        apply_adapter(checkpointed, PrefixTuningConfig(num_virtual_tokens=2))
    model = apply_adapter(lowbit.load(llama_dir).eval(), PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    assert adapter_state_dict(model)["prompt_embeddings"].abs().max() == 0
