"""Prompt tuning (lowbit.peft.prompt) against Hugging Face peft: forward, generation, files, training."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.errors import InvalidSpecError, LowbitError, ModelNotFoundError, ShapeError, UnsupportedModelError
from lowbit.peft import (adapter_state_dict, apply_adapter, delete_adapter, disable_adapters, load_adapter,
                         save_adapter, set_adapter)
from lowbit.peft.prompt import PromptTuningConfig, virtual_tokens

peft = pytest.importorskip("peft")
from prompt_learning_support import assert_files_both_ways, batch, pair  # noqa: E402
N = 3  # virtual tokens


pytestmark = pytest.mark.filterwarnings("ignore")


def prompt_rows(model) -> torch.Tensor:
    return adapter_state_dict(model)["prompt_embeddings"]


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_forward_equals_peft(llama_dir, init):
    ref, model = pair(llama_dir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                         prompt_tuning_init=init),
                      PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init=init))
    torch.testing.assert_close(prompt_rows(model), ref.prompt_encoder["default"].embedding.weight.detach())
    inputs = batch()
    with torch.no_grad():
        want = ref(**inputs, labels=inputs["input_ids"])
        got = model(**inputs, labels=inputs["input_ids"])
    assert got.logits.shape == want.logits.shape == (2, 6 + N, 4096)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    with torch.no_grad():  # positional call, inputs_embeds call
        torch.testing.assert_close(model(inputs["input_ids"]).logits, ref(input_ids=inputs["input_ids"]).logits,
                                   atol=1e-5, rtol=0)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, ref(input_ids=inputs["input_ids"]).logits,
                                   atol=1e-5, rtol=0)
    assert virtual_tokens(model) == N
    config = model.lowbit_peft.configs["default"]
    assert config.token_dim is None  # the user's config is not changed; the resolved one is saved


def test_text_init_equals_peft(llama_dir):
    from transformers import AutoTokenizer

    text = "the quick brown fox"
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ref, model = pair(llama_dir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7,
                                                         prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                                         tokenizer_name_or_path=str(llama_dir)),
                      PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                         prompt_tuning_init_text=text, tokenizer=tokenizer))
    rows = ref.prompt_encoder["default"].embedding.weight.detach()
    torch.testing.assert_close(prompt_rows(model), rows)
    ids = (tokenizer(text)["input_ids"] * 7)[:7]
    torch.testing.assert_close(rows, model.get_input_embeddings().weight[ids].detach())
    by_name = apply_adapter(lowbit.load(llama_dir), PromptTuningConfig(
        num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(llama_dir), tokenizer_kwargs={"trust_remote_code": True}))
    torch.testing.assert_close(prompt_rows(by_name), rows)
    # the saved file names a tokenizer (peft requires one for TEXT) and is marked inference_mode
    data = model.lowbit_peft.configs["default"].to_peft_dict()
    assert "tokenizer" not in data and data["tokenizer_name_or_path"] and data["inference_mode"] is True


def test_generation_equals_peft_forward(llama_dir):
    """transformers' generate and lowbit's Generator give peft's greedy tokens (peft's own generate is
    not the reference: with transformers 5.x it re-prepends the prompt at every step)."""
    from lowbit.generate import Generator

    ref, model = pair(llama_dir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
                      PromptTuningConfig(num_virtual_tokens=N))
    inputs, steps = batch(), 4
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(steps):  # greedy by full forwards through peft
            nxt = ref(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    assert out[:, -steps:].tolist() == ids[:, -steps:].tolist()
    gen = Generator(model, max_cache_len=6 + steps + virtual_tokens(model), compile=False)
    assert gen.generate(inputs["input_ids"][:1], steps).tokens == ids[0, -steps:].tolist()
    assert gen.generate(inputs["input_ids"][:1], steps).tokens == ids[0, -steps:].tolist()  # cache reused


def test_disable_switch_delete(llama_dir):
    base = lowbit.load(llama_dir).eval()
    model = lowbit.load(llama_dir).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    apply_adapter(model, PromptTuningConfig(num_virtual_tokens=2), "a")
    apply_adapter(model, PromptTuningConfig(num_virtual_tokens=4), "b")
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[1] == 6 + 4
        set_adapter(model, "a")
        out_a = model(input_ids=ids).logits
        assert out_a.shape[1] == 6 + 2
        with disable_adapters(model):
            torch.testing.assert_close(model(input_ids=ids).logits, plain)
            assert virtual_tokens(model) == 0
        torch.testing.assert_close(model(input_ids=ids).logits, out_a)
    rows = model.lowbit_prompt_learning.encoders
    assert rows["a"].embedding.weight.requires_grad and not rows["b"].embedding.weight.requires_grad
    with pytest.raises(LowbitError, match="one at a time"):
        set_adapter(model, ["a", "b"])
        model(input_ids=ids)
    set_adapter(model, "a")
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    assert not hasattr(model, "lowbit_prompt_learning")
    assert not model._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain)
    assert not [n for n, _ in model.named_parameters() if "prompt" in n]


def test_files_both_ways(llama_dir, tmp_path):
    from safetensors.torch import load_file

    ref, model = pair(llama_dir, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
                      PromptTuningConfig(num_virtual_tokens=N), seed=3)
    with torch.no_grad():
        model.lowbit_prompt_learning.encoders["default"].embedding.weight.add_(0.5)  # "trained"
    inputs = batch()
    save_adapter(model, tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == {"prompt_embeddings"}
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert data["peft_type"] == "PROMPT_TUNING" and data["token_dim"] == 128 and data["num_layers"] == 2
    assert_files_both_ways(model, ref, llama_dir, tmp_path, inputs)


def test_text_adapter_loads_without_its_tokenizer(llama_dir, tmp_path):
    """A saved TEXT adapter is inference_mode: loading it reads the rows, not the tokenizer."""
    from transformers import AutoTokenizer

    model = apply_adapter(lowbit.load(llama_dir).eval(), PromptTuningConfig(
        num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello world",
        tokenizer=AutoTokenizer.from_pretrained(llama_dir)))
    save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "tokenizer_name_or_path": "no/such-tokenizer"}))
    loaded = load_adapter(lowbit.load(llama_dir).eval(), tmp_path / "a")
    torch.testing.assert_close(prompt_rows(loaded), prompt_rows(model))
    assert loaded.lowbit_peft.configs["default"].prompt_tuning_init == "TEXT"


def test_load_rejects_wrong_shape(llama_dir, tmp_path):
    model = apply_adapter(lowbit.load(llama_dir), PromptTuningConfig(num_virtual_tokens=N))
    save_adapter(model, tmp_path / "a")
    other = make_small(tmp_path)
    with pytest.raises(ShapeError, match="token_dim"):
        load_adapter(lowbit.load(other), tmp_path / "a")


def make_small(tmp_path):
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path / "small", hidden=64, intermediate=64)


def test_minilm_feature_extraction_and_seq_cls(minilm):
    import transformers

    for task, cls in (("FEATURE_EXTRACTION", transformers.AutoModel),
                      ("SEQ_CLS", transformers.AutoModelForSequenceClassification)):
        def loader(path, cls=cls):
            torch.manual_seed(7)  # the classifier head is newly initialised: the same in both
            return cls.from_pretrained(path).eval()

        ref, model = pair(minilm, peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N),
                          PromptTuningConfig(task_type=task, num_virtual_tokens=N), loader=loader)
        inputs = {**batch(), "token_type_ids": torch.zeros(2, 6, dtype=torch.long)}
        inputs["input_ids"] = inputs["input_ids"] % 1000
        with torch.no_grad():
            want, got = ref(**inputs), model(**inputs)
        key = "last_hidden_state" if task == "FEATURE_EXTRACTION" else "logits"
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)


def test_training_on_quantized_base(llama_dir):
    model = lowbit.load(llama_dir)
    lowbit.quantize(model, lowbit.QuantSpec.int_(4, 32, symmetric=False))
    apply_adapter(model, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lowbit_prompt_learning.encoders.default.embedding.weight"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, 4096, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("kwargs, error, field", [
    ({"num_virtual_tokens": 0}, InvalidSpecError, "num_virtual_tokens"),
    ({}, InvalidSpecError, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2, "prompt_tuning_init": "ZEROS"}, InvalidSpecError, "prompt_tuning_init"),
    ({"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "x"}, InvalidSpecError,
     "prompt_tuning_init_text"),
    ({"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, InvalidSpecError,
     "tokenizer"),
    ({"num_virtual_tokens": 2, "tokenizer_kwargs": {"a": 1}}, InvalidSpecError, "tokenizer_kwargs"),
    ({"num_virtual_tokens": 2, "task_type": "SEQ_2_SEQ_LM"}, UnsupportedModelError, "encoder-decoder"),
])
def test_config_errors(kwargs, error, field):
    with pytest.raises(error, match=field):
        PromptTuningConfig(**kwargs)


def test_inject_errors(llama_dir, tmp_path):
    with pytest.raises(ShapeError, match="token_dim"):
        apply_adapter(lowbit.load(llama_dir), PromptTuningConfig(num_virtual_tokens=2, token_dim=32))
    with pytest.raises(ModelNotFoundError, match="tokenizer_name_or_path"):
        apply_adapter(lowbit.load(llama_dir), PromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
            tokenizer_name_or_path=str(tmp_path / "missing")))


def test_peft_json_parses():
    from lowbit.peft.config import config_from_peft_dict

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text="hello", tokenizer_name_or_path="some/tok")
    data = json.loads(json.dumps(config.to_dict(), default=str))
    ours = config_from_peft_dict(data)
    assert isinstance(ours, PromptTuningConfig) and ours.prompt_tuning_init == "TEXT"
    assert ours.num_virtual_tokens == 5 and ours.is_prompt_learning


def test_minilm_seq_cls_files(minilm, tmp_path):
    import transformers

    def loader(path):
        torch.manual_seed(7)
        return transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()

    torch.manual_seed(1)
    ref = peft.get_peft_model(loader(minilm), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)).eval()
    ref.save_pretrained(tmp_path / "theirs")
    ids = batch()["input_ids"] % 1000
    ours = load_adapter(loader(minilm), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(loader(minilm), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)
