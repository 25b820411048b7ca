"""tied_head: share — a quantized output head tied to the input embedding, stored once and read by both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.cli import main
from lowbit.errors import CorruptFileError, InvalidSpecError
from lowbit.eval.size import model_size
from lowbit.formats.spec import QuantSpec
from lowbit.io.checkpoint import save
from lowbit.io.streaming import quantize_pretrained
from lowbit.nn import QuantLinear, SharedQuantEmbedding
from lowbit.quantize import dequantize_model, quantize
from lowbit.recipe import LayerOverride, QuantRecipe
from lowbit.tensor import QuantizedWeight

HEAD = QuantSpec(bits=6, group_size=32, symmetric=False, double_quant=True)
RECIPE = QuantRecipe(QuantSpec(bits=4, group_size=32), "rtn", overrides=(LayerOverride("lm_head", HEAD),),
                     tied_head="share")
IDS = torch.tensor([[0, 5, 17, 4095, 5, 3, 200, 17]])


@pytest.fixture(scope="module")
def shared_model():
    return quantize(lowbit.load("builtin:tiny-lm"), RECIPE)


@pytest.mark.parametrize("spec", [HEAD, QuantSpec(bits=4, group_size=None, granularity="channel", symmetric=True),
                                  QuantSpec(bits=3, granularity="tensor", group_size=None),
                                  QuantSpec(format="nf4", group_size=64, double_quant=True),
                                  QuantSpec(format="fp8_e4m3", granularity="channel", group_size=None,
                                            scale_dtype="float32"),
                                  QuantSpec(format="fp16")])
def test_rows_equal_the_dequantized_head(spec):
    torch.manual_seed(0)
    w = torch.randn(50, 64)
    head = QuantLinear.from_weight(QuantizedWeight.from_float(w, spec), None)
    emb = SharedQuantEmbedding(head)
    full = head.weight.dequantize()
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 1, 2]])
    assert torch.equal(emb(ids), full[ids])
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 64)
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))


def test_one_quantized_matrix_for_embedding_and_head(shared_model):
    m = shared_model
    assert isinstance(m.model.embed_tokens, SharedQuantEmbedding) and m.model.embed_tokens.head is m.lm_head
    assert not m.config.tie_word_embeddings
    deq = m.lm_head.weight.dequantize()
    # the same model in float with the dequantized matrix in both places
    ref = lowbit.load("builtin:tiny-lm")
    for name, module in m.named_modules():
        if isinstance(module, QuantLinear) and name != "lm_head":
            ref.get_submodule(name).weight.data = module.weight.dequantize()
    ref.model.embed_tokens.weight.data = deq.clone()
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    torch.testing.assert_close(m(input_ids=IDS).logits, ref(input_ids=IDS).logits, atol=2e-4, rtol=0)
    # stored once: the float embedding is gone from the size
    size = model_size(m)
    untied = model_size(quantize(lowbit.load("builtin:tiny-lm"), QuantRecipe(RECIPE.default, "rtn",
                                                                          overrides=RECIPE.overrides)))
    assert untied.size_bytes - size.size_bytes == 4096 * 256 * 4  # the float32 embedding the untied model keeps
    assert size.params == model_size(lowbit.load("builtin:tiny-lm")).params


def test_save_load_and_transformers(shared_model, tmp_path):
    out = save(shared_model, tmp_path / "q")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["shared_embeddings"] == {"model.embed_tokens": "lm_head"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("model.embed_tokens") for k in keys) and "lm_head.qdata" in keys
    want = shared_model(input_ids=IDS).logits
    loaded = lowbit.load(out)
    assert isinstance(loaded.model.embed_tokens, SharedQuantEmbedding)
    assert torch.equal(loaded(input_ids=IDS).logits, want)
    lowbit.io.hf_integration.install()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(hf.model.embed_tokens, SharedQuantEmbedding)
    assert torch.equal(hf(input_ids=IDS).logits, want)
    # dequantizing ties a float embedding to the float head again
    dequantize_model(loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.config.tie_word_embeddings
    torch.testing.assert_close(loaded(input_ids=IDS).logits, want, atol=1e-4, rtol=0)


def test_streaming_quantize_equals_in_memory(shared_model, tmp_path):
    result = quantize_pretrained("builtin:tiny-lm", RECIPE, tmp_path / "s", show_progress=False)
    assert result.size.size_bytes == model_size(shared_model).size_bytes
    qcfg = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]
    assert qcfg["source"] == "builtin:tiny-lm"  # the float model it came from (what lowbit report compares with)
    assert torch.equal(lowbit.load(tmp_path / "s")(input_ids=IDS).logits, shared_model(input_ids=IDS).logits)


def test_cli_tied_head_and_recipe_round_trip(tmp_path, capsys):
    assert main(["quantize", "builtin:tiny-lm", "-o", str(tmp_path / "c"), "--bits", "4", "--group-size", "32",
                 "--layer-bits", "lm_head=8", "--tied-head", "share", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(lowbit.load(tmp_path / "c").model.embed_tokens, SharedQuantEmbedding)
    assert report["size_bytes"] < 4096 * 256 * 4  # less than the float32 embedding alone: none is left
    assert QuantRecipe.from_dict(RECIPE.to_dict()) == RECIPE
    with pytest.raises(InvalidSpecError, match="tied_head"):
        QuantRecipe(QuantSpec(), tied_head="keep")
    # --skip with --recipe keeps the recipe's method options and tied_head
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({**RECIPE.to_dict(), "method": "hqq", "options": {"iters": 3}}))
    from lowbit.cli import build_parser, recipe_from_args

    args = build_parser().parse_args(["quantize", "builtin:tiny-lm", "-o", "x", "--recipe", str(recipe),
                                      "--skip", "down_proj"])
    got = recipe_from_args(args)
    assert got.options == (("iters", 3),) and got.tied_head == "share" and got.skip == ("down_proj",)


def test_corrupt_shared_embeddings_config(shared_model, tmp_path):
    out = save(shared_model, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["shared_embeddings"] = {"model.embed_tokens": "model.norm"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="not a quantized module"):
        lowbit.load(out)


def test_gguf_export_writes_one_token_embd_llama_cpp_runs(llama_cpp_module, tmp_path):
    """Code-mappable specs: the shared int8 head becomes token_embd Q8_0 (no output.weight: tied), code for code."""
    from gguf_support import gguf_tensor_types, llama_cpp_ppl, lowbit_ppl, open_llama, token_windows
    from lowbit.eval.perplexity import read_text, tokenize_text
    from lowbit.io.gguf.writer import export_gguf
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    recipe = QuantRecipe(QuantSpec(bits=4, group_size=32, symmetric=True), "rtn",
                         overrides=(LayerOverride("lm_head", QuantSpec(bits=8, group_size=32, symmetric=True)),),
                         tied_head="share")
    model = quantize(lowbit.load("builtin:tiny-lm"), recipe)
    save(model, tmp_path / "q")
    report = export_gguf(tmp_path / "q", tmp_path / "q.gguf", type="q4_0", show_progress=False)
    types = gguf_tensor_types(tmp_path / "q.gguf")
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert "token_embd.weight" in report.code_mapped and report.max_code_map_error == 0.0
    ids = tokenize_text(load_tokenizer(model), read_text(builtin_dir("tiny-lm") / "eval.txt"))
    windows = token_windows(ids, 128, max_windows=3)
    ours = lowbit_ppl(model, windows)
    theirs = llama_cpp_ppl(open_llama(llama_cpp_module, tmp_path / "q.gguf", 128), windows)
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)


def test_gptq_quantizes_the_head_as_the_planner_measures_it():
    """Outside the blocks GPTQ has no captured inputs: the head gets GPTQ with H = I (RTN on GPTQ's MSE-clipped
    grid), which is what `lowbit plan --method gptq` measured for it."""
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize

    spec = QuantSpec(bits=3, group_size=32, symmetric=False, double_quant=True)
    recipe = QuantRecipe(QuantSpec(bits=4, group_size=32), "gptq", overrides=(LayerOverride("lm_head", spec),),
                         tied_head="share")
    float_head = lowbit.load("builtin:tiny-lm").lm_head.weight.detach().clone()
    model = quantize(lowbit.load("builtin:tiny-lm"), recipe, calibration=CalibConfig(samples=4, seq_len=64))
    want = gptq_quantize(float_head, torch.eye(float_head.shape[1]), spec, GPTQConfig(), "lm_head")
    assert torch.equal(model.lm_head.weight.dequantize(), want.dequantize())
    rtn = QuantizedWeight.from_float(float_head, spec).dequantize()
    assert ((want.dequantize() - float_head) ** 2).sum() < ((rtn - float_head) ** 2).sum()  # the clip helps
