"""GGUF export/import with llama.cpp (llama-cpp-python) as the real client, on the built-in LM and tiny
random Llama-family models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError, UnsupportedModelError
from lowbit.eval.perplexity import read_text, tokenize_text
from lowbit.io.gguf.writer import export_gguf
from lowbit.models.resolve import builtin_dir

from gguf_support import (gguf_tensor_types, llama_cpp_ppl, llama_cpp_quantize, llama_logits, lowbit_ppl,
                          open_llama, token_windows)

SEQ = 128


@pytest.fixture(scope="module")
def windows() -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_dir("tiny-lm")))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    return token_windows(ids, SEQ, max_windows=6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for t in ("f16", "q8_0", "q4_0", "q4_k_m", "q6_k"):
        out[t] = root / f"tiny-{t}.gguf"
        export_gguf("builtin:tiny-lm", out[t], type=t, show_progress=False)
    return out


def test_f16_matches_float_model_in_llama_cpp(llama_cpp_module, exported, windows):
    model = lowbit.load("builtin:tiny-lm")
    llm = open_llama(llama_cpp_module, exported["f16"], SEQ)
    agree = total = 0
    for w in windows:
        ref = model(input_ids=torch.tensor([w])).logits[0].detach().numpy()
        got = llama_logits(llm, w)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(w)
    assert agree / total >= 0.995, f"top-1 agreement {agree / total:.4f}"


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0", "q4_k_m", "q6_k"])
def test_llama_cpp_perplexity_equals_lowbit_on_same_weights(llama_cpp_module, exported, windows, tmp_path, qtype):
    """llama.cpp's perplexity of our file is within 1 % of lowbit's perplexity of the same (imported) weights."""
    from lowbit.io.gguf.importer import import_gguf

    import_gguf(exported[qtype], tmp_path / "imp", show_progress=False)
    ours = lowbit_ppl(lowbit.load(tmp_path / "imp"), windows)
    theirs = llama_cpp_ppl(open_llama(llama_cpp_module, exported[qtype], SEQ), windows)
    assert abs(theirs / ours - 1) < 0.01, (qtype, ours, theirs)


@pytest.mark.parametrize("mix", ["q4_k_m", "q3_k_m", "q5_k_m", "q4_k_s", "q2_k", "q4_0"])
def test_mix_types_match_llama_quantize(llama_cpp_module, exported, tmp_path, mix):
    """Which tensor gets which block type: ours equals llama.cpp's own llama-quantize on the same model."""
    theirs = tmp_path / "theirs.gguf"
    llama_cpp_quantize(llama_cpp_module, exported["f16"], theirs, f"MOSTLY_{mix.upper()}")
    ours = tmp_path / "ours.gguf"
    export_gguf("builtin:tiny-lm", ours, type=mix, show_progress=False)
    assert gguf_tensor_types(ours) == gguf_tensor_types(theirs)


def test_code_mapped_int4_is_exact(llama_cpp_module, tmp_path, windows):
    """A lowbit int4 (GPTQ) model is written code for code: the GGUF holds exactly lowbit's weights."""
    import gguf

    from lowbit.io.gguf.reader import read_gguf

    q = tmp_path / "q"
    assert main(["quantize", "builtin:tiny-lm", "-o", str(q), "--method", "gptq", "--bits", "4", "--group-size",
                 "32", "--calib-samples", "8", "--quiet"]) == 0
    out = tmp_path / "q.gguf"
    report = export_gguf(q, out, type="q4_0", show_progress=False)
    assert len(report.code_mapped) == 4 * 7
    model = lowbit.load(q)
    g = read_gguf(out)
    name = "blk.1.ffn_down.weight"
    info = g.tensors[name]
    data = g.raw_rows(name).numpy()
    deq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(info.ggml_type))
    want = model.model.layers[1].mlp.down_proj.weight.dequantize().numpy()
    assert np.abs(deq - want).max() <= report.max_code_map_error + 1e-7
    llm = open_llama(llama_cpp_module, out, SEQ)
    ours = lowbit_ppl(model, windows)
    theirs = llama_cpp_ppl(llm, windows)
    assert abs(theirs / ours - 1) < 0.01, (ours, theirs)


def test_import_llama_cpp_files_equals_gguf_dequantize(llama_cpp_module, exported, tmp_path):
    """llama.cpp-made Q4_0 and Q4_K_M files → lowbit model whose weights are gguf.quants.dequantize's."""
    import gguf

    from lowbit.io.gguf.arch import qk_row_permutation
    from lowbit.io.gguf.importer import import_gguf
    from lowbit.io.gguf.reader import read_gguf

    for ftype in ("MOSTLY_Q4_0", "MOSTLY_Q4_K_M"):
        src = tmp_path / f"{ftype}.gguf"
        llama_cpp_quantize(llama_cpp_module, exported["f16"], src, ftype)
        import_gguf(src, tmp_path / ftype, show_progress=False)
        model = lowbit.load(tmp_path / ftype)
        g = read_gguf(src)
        sd = {}
        for name, mod in model.named_modules():
            if hasattr(mod, "spec"):
                sd[name + ".weight"] = mod.weight.dequantize()
        sd.update({k: v for k, v in model.state_dict().items() if v.is_floating_point()})
        for name, info in g.tensors.items():
            ref = gguf.quants.dequantize(g.raw_rows(name).numpy(), gguf.GGMLQuantizationType(info.ggml_type))
            ref = torch.from_numpy(np.ascontiguousarray(ref)).float().reshape(info.shape)
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = 4 if "attn_q" in name else 2
                ref = ref[torch.argsort(qk_row_permutation(ref.shape[0], heads))]
            hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(name)
            if hf is None:
                from lowbit.io.gguf.arch import hf_name

                hf = hf_name(name)
            assert torch.equal(sd[hf].float(), ref), name


def test_cli_contract(tmp_path):
    out = tmp_path / "m.gguf"
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lowbit", "export", "builtin:tiny-lm", "--format", "gguf", "--type",
                        "q4_k_m", "-o", str(out), "--json", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("out", "type", "file_bytes", "bits_per_weight", "types", "seconds", "tensors"):
        assert key in summary
    assert summary["file_bytes"] == out.stat().st_size
    r = subprocess.run([sys.executable, "-m", "lowbit", "import", str(out), "-o", str(tmp_path / "imp"), "--json",
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "imp" / "config.json").is_file()
    r = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(out), "--ppl", "--json", "--quiet"],
                       capture_output=True, text=True, env={**__import__("os").environ,
                                                            "LOWBIT_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["ppl"] > 1


def test_unsupported_architecture_lists_supported(gpt2_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        export_gguf(gpt2_dir, tmp_path / "x.gguf", type="f16", show_progress=False)
    assert not (tmp_path / "x.gguf").exists()
    assert not list(tmp_path.iterdir())


def test_bad_type_and_existing_output(tmp_path):
    with pytest.raises(LowbitError, match="q4_k_m"):
        export_gguf("builtin:tiny-lm", tmp_path / "x.gguf", type="q4_z", show_progress=False)
    (tmp_path / "y.gguf").write_bytes(b"old")
    with pytest.raises(LowbitError, match="exists"):
        export_gguf("builtin:tiny-lm", tmp_path / "y.gguf", type="f16", show_progress=False)
    assert (tmp_path / "y.gguf").read_bytes() == b"old"


def _tiny(arch: str, path: Path, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import copy_builtin_tokenizer

    base = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    base.update(extra)
    config = AutoConfig.for_model(arch, **base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.uniform_(0.8, 1.2)
    model.save_pretrained(path)
    copy_builtin_tokenizer(path)
    return path


@pytest.mark.parametrize("arch,extra", [
    ("llama", {"tie_word_embeddings": False, "attention_bias": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}}),
    ("mistral", {"tie_word_embeddings": False, "sliding_window": None}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"tie_word_embeddings": False, "head_dim": 32}),
])
def test_architectures_run_in_llama_cpp(llama_cpp_module, tmp_path, windows, arch, extra):
    """Tiny random Llama/Mistral/Qwen2/Qwen3 (GQA, untied/tied, llama3 rope scaling, q/k/v biases, q/k norms,
    head_dim ≠ hidden/heads): llama.cpp's logits of the F16 export match transformers'."""
    from transformers import AutoModelForCausalLM

    src = _tiny(arch, tmp_path / arch, **extra)
    out = tmp_path / f"{arch}.gguf"
    export_gguf(src, out, type="f32", show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    llm = open_llama(llama_cpp_module, out, SEQ)
    w = windows[0]
    ref = hf(input_ids=torch.tensor([w])).logits[0].detach().numpy()
    got = llama_logits(llm, w)
    assert np.abs(ref - got).max() < 1e-4 * max(1.0, np.abs(ref).max()), np.abs(ref - got).max()


def test_gguf_is_a_model_for_quantize_and_generate(exported, tmp_path, monkeypatch, capsys):
    """A .gguf path is a MODEL: quantize and generate read it (imported once into the cache)."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["quantize", str(exported["q8_0"]), "-o", str(tmp_path / "q"), "--bits", "4", "--quiet"]) == 0
    assert main(["generate", str(exported["q8_0"]), "--prompt", "The city", "--max-new-tokens", "4", "--no-compile",
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"]
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1  # imported once, reused


def test_export_gptq_cli_round_trip(tmp_path, capsys):
    """lowbit quantize --method gptq → export --format gptq → eval: the GPTQ files give the same perplexity."""
    q = tmp_path / "q"
    assert main(["quantize", "builtin:tiny-lm", "-o", str(q), "--method", "gptq", "--bits", "4", "--group-size", "64",
                 "--calib-samples", "4", "--quiet"]) == 0
    assert main(["export", str(q), "--format", "gptq", "-o", str(tmp_path / "g"), "--json", "--quiet"]) == 0
    capsys.readouterr()
    ppl = []
    for d in (q, tmp_path / "g"):
        assert main(["eval", str(d), "--ppl", "--json", "--quiet"]) == 0
        ppl.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"])
    assert ppl[0] == ppl[1]
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 64


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["f32", "bf16", "q5_0", "q5_1", "q4_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
                                 "q4_k_s", "q5_k_s", "q5_k_m"])
def test_every_type_perplexity_equals_lowbit_all_windows(llama_cpp_module, tmp_path, mix):
    """The remaining types, on every held-out window of 256 (slow): llama.cpp within 1 % of lowbit."""
    from transformers import AutoTokenizer

    from lowbit.io.gguf.importer import import_gguf

    tok = AutoTokenizer.from_pretrained(str(builtin_dir("tiny-lm")))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    wins = token_windows(ids, 256)
    out = tmp_path / f"{mix}.gguf"
    export_gguf("builtin:tiny-lm", out, type=mix, show_progress=False)
    import_gguf(out, tmp_path / "imp", show_progress=False)
    ours = lowbit_ppl(lowbit.load(tmp_path / "imp"), wins)
    theirs = llama_cpp_ppl(open_llama(llama_cpp_module, out, 256), wins)
    assert abs(theirs / ours - 1) < 0.01, (mix, ours, theirs)
