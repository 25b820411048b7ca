"""Quantize → save → load gives identical outputs, for Llama, GPT-2 (Conv1D) and MiniLM (BERT)."""

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import QuantSpec
from lowbit.eval.size import model_size
from lowbit.errors import InvalidSpecError
from lowbit.nn import QuantLinear
from lowbit.recipe import LayerOverride, QuantRecipe

SPECS = [QuantSpec.int_(4, 64, symmetric=False), QuantSpec.int_(8, None), QuantSpec.nf4(64, double_quant=True),
         QuantSpec.int_(3, 32), QuantSpec.fp8()]


def _inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, 24), generator=g)}


def _out(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "gpt2", "minilm"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.describe() for s in SPECS])
def test_save_load_identical(family: str, spec: QuantSpec, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = request.getfixturevalue({"llama": "llama_dir", "gpt2": "gpt2_dir", "minilm": "minilm"}[family])
    model = lowbit.quantize(lowbit.load(src), spec)
    inputs = _inputs(model.config.vocab_size)
    before = _out(model, inputs)
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert torch.equal(_out(loaded, inputs), before)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) > 0
    assert (tmp_path / "q" / "tokenizer.json").is_file() or (tmp_path / "q" / "vocab.txt").is_file()


@pytest.mark.parametrize("family", ["llama", "gpt2", "minilm"])
def test_streaming_equals_in_memory(family: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = request.getfixturevalue({"llama": "llama_dir", "gpt2": "gpt2_dir", "minilm": "minilm"}[family])
    spec = QuantSpec.int_(4, 32, symmetric=False)
    result = lowbit.quantize_pretrained(src, spec, tmp_path / "q", show_progress=False)
    streamed = lowbit.load(tmp_path / "q")
    in_memory = lowbit.quantize(lowbit.load(src), spec)
    inputs = _inputs(streamed.config.vocab_size)
    assert torch.equal(_out(streamed, inputs), _out(in_memory, inputs))
    size = model_size(streamed)
    assert (result.size.params, result.size.size_bytes, result.size.linear_bytes) == \
           (size.params, size.size_bytes, size.linear_bytes)
    assert result.layers_quantized == sum(isinstance(m, QuantLinear) for m in streamed.modules())


def test_float_load_matches_transformers(llama_dir: Path) -> None:
    import transformers

    ours = lowbit.load(llama_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    inputs = _inputs(ours.config.vocab_size)
    assert torch.equal(_out(ours, inputs), _out(theirs, inputs))


def test_tied_embeddings_stay_tied(tied_llama_dir: Path, tmp_path: Path) -> None:
    lowbit.quantize_pretrained(tied_llama_dir, QuantSpec.int_(4, 64), tmp_path / "q", show_progress=False)
    model = lowbit.load(tmp_path / "q")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not isinstance(model.lm_head, QuantLinear)


HEAD_INT8 = LayerOverride("lm_head", QuantSpec.int_(8, None))


def test_tied_head_named_by_an_override_is_quantized_and_untied(tied_llama_dir: Path, tmp_path: Path) -> None:
    """Streaming and in-memory quantization untie a tied head an override names: the embedding keeps
    its float weight, the head gets its own quantized copy; both round-trip through save/load."""
    recipe = QuantRecipe(QuantSpec.int_(4, 64), overrides=(HEAD_INT8,))
    float_model = lowbit.load(tied_llama_dir)
    embedding = float_model.model.embed_tokens.weight.detach().clone()
    in_memory = lowbit.quantize(lowbit.load(tied_llama_dir), recipe)
    assert isinstance(in_memory.lm_head, QuantLinear) and in_memory.lm_head.spec == HEAD_INT8.spec
    assert in_memory.config.tie_word_embeddings is False
    assert torch.equal(in_memory.model.embed_tokens.weight, embedding)  # the embedding itself is untouched
    head_error = (in_memory.lm_head.dequantize().weight - embedding).abs().max() / embedding.abs().max()
    assert 0 < head_error < 0.01

    lowbit.quantize_pretrained(tied_llama_dir, recipe, tmp_path / "q", show_progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" in config["quantization_config"]["modules"]
    streamed = lowbit.load(tmp_path / "q")
    assert isinstance(streamed.lm_head, QuantLinear)
    assert streamed.lm_head.qdata.data_ptr() != streamed.model.embed_tokens.weight.data_ptr()
    inputs = _inputs(streamed.config.vocab_size)
    assert torch.equal(_out(streamed, inputs), _out(in_memory, inputs))

    lowbit.save(in_memory, tmp_path / "saved")
    assert torch.equal(_out(lowbit.load(tmp_path / "saved"), inputs), _out(in_memory, inputs))


def test_tied_head_is_not_untied_by_a_skip_list_or_an_activation_method(tied_llama_dir: Path) -> None:
    model = lowbit.quantize(lowbit.load(tied_llama_dir), QuantRecipe(QuantSpec.int_(4, 64), skip=()))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    recipe = QuantRecipe(QuantSpec.int_(8, None), method="smoothquant", overrides=(HEAD_INT8,))
    with pytest.raises(InvalidSpecError, match="lm_head: its weight is tied"):
        lowbit.quantize(lowbit.load(tied_llama_dir), recipe)


def test_sharded_output_round_trip(llama_dir: Path, tmp_path: Path) -> None:
    lowbit.quantize_pretrained(llama_dir, QuantSpec.int_(4, 64), tmp_path / "q", show_progress=False,
                               max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "q").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "q" / "model.safetensors.index.json").is_file()
    model = lowbit.load(tmp_path / "q")
    reference = lowbit.quantize(lowbit.load(llama_dir), QuantSpec.int_(4, 64))
    inputs = _inputs(model.config.vocab_size)
    assert torch.equal(_out(model, inputs), _out(reference, inputs))


def test_quantization_config_is_versioned(llama_dir: Path, tmp_path: Path) -> None:
    lowbit.quantize_pretrained(llama_dir, QuantSpec.int_(4, 64), tmp_path / "q", show_progress=False)
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "lowbit" and qcfg["format_version"] == 1
    assert qcfg["default_spec"]["bits"] == 4 and len(qcfg["modules"]) == 14


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_calibration_free_methods_stream_and_reload(method: str, llama_dir: Path, tmp_path: Path) -> None:
    recipe = lowbit.QuantRecipe(QuantSpec.int_(4, 64, symmetric=False), method=method)
    result = lowbit.quantize_pretrained(llama_dir, recipe, tmp_path / "q", show_progress=False)
    model = lowbit.load(tmp_path / "q")
    in_memory = lowbit.quantize(lowbit.load(llama_dir), recipe)
    inputs = _inputs(model.config.vocab_size)
    assert torch.equal(_out(model, inputs), _out(in_memory, inputs))
    stored = {name: m.spec for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert stored == result.layer_specs
    if method == "hqq":
        assert all(spec.zero_dtype == "float16" for spec in stored.values())
