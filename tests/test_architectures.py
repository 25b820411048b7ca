"""One table of tiny random models, one per architecture family, through the whole pipeline.

Each row is built from its config (hidden 64, 2 layers, the built-in tokenizer's 4096-token vocabulary)
and saved by transformers' ``save_pretrained``; then, with RTN (output head included, 8-bit: the tied
and renamed heads) and GPTQ: ``lowbit quantize`` → ``lowbit eval --ppl`` → ``lowbit generate`` →
``AutoModelForCausalLM.from_pretrained`` of the result, whose logits must equal ``lowbit.load``'s.

GGUF export rows: ``gguf_arch`` is llama.cpp's architecture name for a row (None where llama.cpp has
none); parametrize the export/round-trip test over ``[a for a in ARCHS if a.gguf_arch]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import lowbit
from lowbit.models.resolve import builtin_dir

from conftest import copy_builtin_tokenizer

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
LLAMA_LIKE = dict(TINY, intermediate_size=128, num_key_value_heads=2)


@dataclass(frozen=True)
class Arch:
    """A row: a transformers model type, its causal-LM class and the config of a tiny random instance."""

    model_type: str
    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    gguf_arch: str | None = None  # llama.cpp architecture name (GGUF export rows); None: not in llama.cpp

    def __str__(self) -> str:
        return self.model_type


ARCHS = [
    Arch("llama", "LlamaForCausalLM", LLAMA_LIKE, "llama"),
    Arch("mistral", "MistralForCausalLM", LLAMA_LIKE, "llama"),
    Arch("qwen2", "Qwen2ForCausalLM", LLAMA_LIKE, "qwen2"),  # q/k/v biases
    Arch("qwen3", "Qwen3ForCausalLM", dict(LLAMA_LIKE, head_dim=16), "qwen3"),  # q/k norms
    Arch("phi3", "Phi3ForCausalLM", dict(LLAMA_LIKE, pad_token_id=3), "phi3"),  # fused qkv_proj, gate_up_proj
    # tied embeddings, logit soft-capping, alternating sliding-window layers
    Arch("gemma2", "Gemma2ForCausalLM", dict(LLAMA_LIKE, head_dim=16), "gemma2"),
    Arch("gpt2", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256), "gpt2"),  # Conv1D, tied
    # fused query_key_value; checkpoints call the head embed_out (transformers renames it lm_head)
    Arch("gpt_neox", "GPTNeoXForCausalLM", dict(TINY, intermediate_size=128), "gptneox"),
    Arch("opt", "OPTForCausalLM", dict(TINY, ffn_dim=128, word_embed_proj_dim=64), None),  # model.decoder prefix
    Arch("falcon", "FalconForCausalLM", dict(TINY), "falcon"),  # fused multi-query query_key_value
]

PROMPT = "Once upon a time"


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    from lowbit.cli import main

    code = main(argv + ["--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{model type: directory}, each model built (from its config) and saved on first use."""
    return {}


def _float_dir(arch: Arch, dirs: dict[str, Path], root: Path) -> Path:
    if arch.model_type not in dirs:
        import transformers

        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(arch.model_type, vocab_size=4096, bos_token_id=0,
                                                   eos_token_id=1, **arch.config)
        path = root / arch.model_type
        getattr(transformers, arch.model_class)(config).save_pretrained(path)
        copy_builtin_tokenizer(path)
        dirs[arch.model_type] = path
    return dirs[arch.model_type]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch")


@pytest.fixture(scope="module")
def ppl_text(root: Path) -> Path:
    path = root / "eval-short.txt"
    path.write_text((builtin_dir("tiny-lm") / "eval.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    return path


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))

# RTN also quantizes the output head (8-bit; untied from the embedding where the config ties them)
METHODS = {
    "rtn": ["--method", "rtn", "--bits", "4", "--group-size", "32", "--layer-bits", "lm_head=8"],
    "gptq": ["--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
             str(builtin_dir("tiny-lm") / "calib.txt"), "--calib-samples", "2", "--calib-seq-len", "32"],
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_quantize_eval_generate_from_pretrained(arch: Arch, method: str, arch_dirs: dict[str, Path], root: Path,
                                                ppl_text: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from lowbit.models.build import output_head_name
    from lowbit.models.targets import counted_linear_names
    from lowbit.nn.quant_linear import QuantLinear

    src = _float_dir(arch, arch_dirs, root)
    out = tmp_path / "q"
    q = _run(["quantize", str(src), "-o", str(out), *METHODS[method]], capsys)
    reference = lowbit.load(src)
    expected = set(counted_linear_names(reference)) | ({output_head_name(reference)} if method == "rtn" else set())
    model = lowbit.load(out)
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} == expected
    assert q["layers_quantized"] == len(expected)

    ref_logits, logits = _logits(reference, IDS), _logits(model, IDS)
    assert torch.isfinite(logits).all()
    assert (logits - ref_logits).norm() < 0.35 * ref_logits.norm()  # int4 of a random model: ~0.1

    e = _run(["eval", str(out), "--ppl", str(ppl_text), "--seq-len", "32"], capsys)
    assert math.isfinite(e["ppl"]) and 1.0 < e["ppl"] < 3 * 4096  # a random model: about the vocabulary size
    g = _run(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "3", "--no-compile"], capsys)
    assert 1 <= len(g["tokens"]) <= 3 and isinstance(g["text"], str)

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert {n for n, m in hf.named_modules() if isinstance(m, QuantLinear)} == expected
    assert torch.allclose(_logits(hf, IDS), logits, rtol=0, atol=1e-6)
    hf.save_pretrained(tmp_path / "resaved")
    assert torch.allclose(_logits(lowbit.load(tmp_path / "resaved"), IDS), logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_float_load_matches_transformers(arch: Arch, arch_dirs: dict[str, Path], root: Path) -> None:
    """lowbit.load reads transformers' own files (its checkpoint key renames applied) to the same model."""
    from transformers import AutoModelForCausalLM

    src = _float_dir(arch, arch_dirs, root)
    assert torch.allclose(_logits(lowbit.load(src), IDS), _logits(AutoModelForCausalLM.from_pretrained(src), IDS),
                          rtol=0, atol=1e-6)


def test_key_renamer_uses_transformers_tables() -> None:
    import transformers

    from lowbit.io.checkpoint import map_checkpoint_key
    from lowbit.models.build import build_empty_model
    from lowbit.models.key_renames import KeyRenamer

    arch = next(a for a in ARCHS if a.model_type == "gpt_neox")
    config = transformers.AutoConfig.for_model(arch.model_type, vocab_size=4096, **arch.config).to_dict()
    model = build_empty_model({**config, "architectures": [arch.model_class]})
    rename = KeyRenamer(model)
    assert rename("embed_out.weight") == "lm_head.weight"
    assert rename("embed_out.qdata") == "lm_head.qdata"  # packed tensors of a quantized head too
    assert rename("gpt_neox.layers.0.attention.dense.weight") == "gpt_neox.layers.0.attention.dense.weight"
    expected = set(model.state_dict())
    assert map_checkpoint_key("embed_out.weight", expected, "gpt_neox", rename) == "lm_head.weight"
    assert map_checkpoint_key("lm_head.weight", expected, "gpt_neox", rename) == "lm_head.weight"  # lowbit's files
    assert map_checkpoint_key("layers.0.attention.dense.weight", expected, "gpt_neox", rename) is not None
    assert map_checkpoint_key("embed_out.weight", expected, "gpt_neox") is None  # without the renames


def test_key_renamer_falls_back_to_transformers_4_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 4.x: the class's regex table (first match wins), then its per-key legacy fix."""
    from lowbit.models import key_renames

    class Old(torch.nn.Module):
        _checkpoint_conversion_mapping = {r"^language_model\.model": "model.language_model", r"^vision": "model.vision"}

        @staticmethod
        def _fix_state_dict_key_on_load(key: str) -> tuple[str, bool]:
            return key.replace("LayerNorm.gamma", "LayerNorm.weight"), "gamma" in key

    monkeypatch.setattr(key_renames, "_conversion_mapping", lambda model: None)
    rename = key_renames.KeyRenamer(Old())
    assert rename("language_model.model.layers.0.LayerNorm.gamma") == "model.language_model.layers.0.LayerNorm.weight"
    assert rename("lm_head.weight") == "lm_head.weight" and rename.converter_for("lm_head.weight") is None
    assert not key_renames.KeyRenamer(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_gguf_export(arch: Arch, arch_dirs: dict[str, Path], root: Path, tmp_path: Path) -> None:
    """Architectures the GGUF writer supports export (GPTQ int4 g32 → Q4_1 code for code) and run in llama.cpp
    with lowbit's logits; the others are refused with the list of supported ones, nothing written."""
    from lowbit.errors import UnsupportedModelError
    from lowbit.io.gguf.arch import ARCHS as GGUF_ARCHS
    from lowbit.io.gguf.writer import export_gguf

    src = _float_dir(arch, arch_dirs, root)
    out = tmp_path / "m.gguf"
    if arch.model_class not in GGUF_ARCHS:
        with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
            export_gguf(src, out, type="q8_0", show_progress=False)
        assert not out.exists()
        return
    from lowbit.cli import main

    q = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(q), *METHODS["gptq"], "--quiet"]) == 0
    # float embedding/head stay F32 so the file holds exactly lowbit's model
    report = export_gguf(q, out, type="q4_1", tensor_types=["^token_embd=f32", "^output\\.=f32"], show_progress=False)
    model = lowbit.load(q)
    n_quant = sum(1 for m in model.modules() if hasattr(m, "spec"))
    assert len(report.code_mapped) == n_quant
    from conftest import require_llama_cpp
    from gguf_support import llama_logits, open_llama

    llm = open_llama(require_llama_cpp(), out, 64)
    ids = IDS[0].tolist()
    got = torch.from_numpy(llama_logits(llm, ids))
    want = _logits(model, IDS[:1])[0]
    # llama.cpp rounds activations to 8 bits (Q8_1) for Q4_1 matmuls: small noise, no systematic difference
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.03, rel
