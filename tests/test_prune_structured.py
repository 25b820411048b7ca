"""Structured pruning (heads, MLP neurons, blocks → a smaller dense model): exact shapes and parameter counts,
the same logits through transformers and lowbit.load, zero-importance parts are the ones removed, GQA errors,
data-driven beats random, the CLI, quantize/export after pruning; merging LoRA keeps a pruned base's zeros."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.calib_data import CalibConfig
from lowbit.cli import main
from lowbit.compress.structured import (StructuredConfig, achievable_head_fractions, count_params, head_plan,
                                        prune_structured)
from lowbit.errors import InvalidSpecError, UnsupportedModelError

from conftest import copy_builtin_tokenizer, make_tiny_llama, train_steps

transformers = pytest.importorskip("transformers")

CALIB = CalibConfig(samples=4, seq_len=32)
IDS = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
HIDDEN, INTER, VOCAB = 192, 256, 4096  # 192: a multiple of 8 and of 6 heads (LlamaConfig checks it)


def _make(path: Path, arch: str = "llama", heads: int = 8, kv: int = 4, layers: int = 3, hidden: int = HIDDEN) -> Path:
    """A tiny random decoder of the given family with the built-in tokenizer."""
    torch.manual_seed(0)
    common = dict(hidden_size=hidden, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
    config = {"llama": lambda: transformers.LlamaConfig(**common),
              "qwen2": lambda: transformers.Qwen2Config(**common),                  # q/k/v biases
              "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=32)}[arch]()  # q_norm/k_norm, own head_dim
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    copy_builtin_tokenizer(path)
    return path


def _st_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _expected_params(q: int, kv: int, d: int, inter: int, layers: int) -> int:
    per_layer = HIDDEN * q * d * 2 + HIDDEN * kv * d * 2 + 3 * HIDDEN * inter + 2 * HIDDEN
    return 2 * VOCAB * HIDDEN + HIDDEN + layers * per_layer


def test_exact_shapes_counts_and_both_loaders(tmp_path: Path) -> None:
    """8 q / 4 kv heads of 24: 25 % heads → 6 q / 3 kv (one KV group per layer); 25 % MLP; 1 of 3 blocks."""
    src = _make(tmp_path / "dense")
    model = lowbit.load(src)
    assert count_params(model) == _expected_params(8, 4, 24, INTER, 3)
    result = prune_structured(model, StructuredConfig(heads=0.25, mlp=0.25, blocks=1), calib=CALIB)
    shape = {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 24, "intermediate_size": 192,
             "num_hidden_layers": 2}
    assert result.shape_after == shape and {k: getattr(model.config, k) for k in shape} == shape
    assert result.params_before == _expected_params(8, 4, 24, INTER, 3)
    assert result.params_after == count_params(model) == _expected_params(6, 3, 24, 192, 2)
    assert len(result.removed_blocks) == 1 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    for index, removal in result.layers.items():
        assert len(removal.kv_heads) == 1 and len(removal.heads) == 2 and len(removal.neurons) == 64
        g = removal.kv_heads[0]
        assert removal.heads == [2 * g, 2 * g + 1]  # a KV group goes with exactly its query heads
        assert removal.influence is not None and removal.removed == (index in result.removed_blocks)
    report = result.to_dict()
    assert report["param_ratio"] == pytest.approx(result.params_after / result.params_before, abs=1e-6)
    assert set(report["per_layer"]["0"]) == {"heads_removed", "kv_heads_removed", "neurons_removed",
                                             "block_influence", "block_removed"}
    with torch.no_grad():
        ours = model(IDS).logits
    lowbit.save(model, tmp_path / "pruned")
    saved = _st_bytes(src) - _st_bytes(tmp_path / "pruned")  # float32: 4 bytes a parameter, headers aside
    assert abs(saved - 4 * (result.params_before - result.params_after)) < 16_384
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    again = lowbit.load(tmp_path / "pruned")
    assert again.config.lowbit_pruning[-1]["removed_blocks"] == result.removed_blocks
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours)
        torch.testing.assert_close(again(IDS).logits, ours)
        cached = hf.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False)  # the KV cache follows layer_idx
        full = hf(cached).logits[0, 3:-1].argmax(-1)
    assert torch.equal(cached[0, 4:], full[-6:])


def _zero_unimportant(model: torch.nn.Module, drop_heads: list[int], head_dim: int, dead_block: int,
                      seed: int = 0) -> list[list[int]]:
    """Zero o_proj columns of ``drop_heads`` and 25 % of down_proj columns per layer; make one block the identity."""
    g = torch.Generator().manual_seed(seed)
    dead_neurons = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
            for h in drop_heads:
                o[:, h * head_dim:(h + 1) * head_dim] = 0
            neurons = torch.randperm(INTER, generator=g)[:INTER // 4].sort().values.tolist()
            down[:, neurons] = 0
            dead_neurons.append(neurons)
            if i == dead_block:
                o.zero_()
                down.zero_()
    return dead_neurons


# (family, q heads, kv heads, heads fraction, the heads zeroed: exactly what that fraction can remove)
CASES = [("llama", 8, 4, 0.25, [4, 5]),         # one whole KV group (group 2)
         ("qwen2", 8, 2, 0.25, [1, 6]),         # one query head from each of the 2 groups of 4 (biases)
         ("qwen3", 4, 2, 0.5, [2, 3])]          # 50 %: whole groups preferred (q_norm/k_norm, head_dim 32)


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
@pytest.mark.parametrize("arch,q,kv,fraction,dead", CASES, ids=[c[0] for c in CASES])
def test_removes_exactly_the_dead_parts_and_keeps_the_output(tmp_path: Path, arch: str, q: int, kv: int,
                                                            fraction: float, dead: list[int], importance: str) -> None:
    model = lowbit.load(_make(tmp_path / arch, arch, q, kv))
    head_dim = getattr(model.config, "head_dim", None) or HIDDEN // q
    dead_neurons = _zero_unimportant(model, dead, head_dim, dead_block=1)
    with torch.no_grad():
        before = model(IDS).logits
    blocks = 1 if importance == "activation" else 0
    result = prune_structured(model, StructuredConfig(heads=fraction, mlp=0.25, blocks=blocks, importance=importance),
                              calib=CALIB)
    assert result.removed_blocks == ([1] if blocks else [])
    for index in (0, 2):
        assert result.layers[index].heads == dead and result.layers[index].neurons == dead_neurons[index]
    assert model.config.num_attention_heads == q - len(dead)
    assert model.config.num_attention_heads % model.config.num_key_value_heads == 0
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, atol=2e-5, rtol=1e-4)
    lowbit.save(model, tmp_path / "p")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, before, atol=2e-5, rtol=1e-4)


def test_gqa_and_config_errors(tmp_path: Path) -> None:
    assert achievable_head_fractions(4, 2) == [0.0, 0.5]
    assert achievable_head_fractions(8, 2) == [0.0, 0.25, 0.5, 0.75]
    assert head_plan(0.5, 8, 4).drop_groups == 2 and head_plan(0.25, 8, 2).drop_per_group == 1
    model = lowbit.load(make_tiny_llama(tmp_path / "l"))  # 4 q heads / 2 KV heads
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidSpecError, match=r"heads=0.25: 4 query heads in 2 KV groups.*0 %, 50 %"):
        prune_structured(model, StructuredConfig(heads=0.25))
    with pytest.raises(InvalidSpecError, match=r"0 %, 25 %, 50 %, 75 %"):
        head_plan(0.3, 8, 4)
    narrow = lowbit.load(_make(tmp_path / "narrow", hidden=128))  # 128 / 6 heads: LlamaConfig refuses it
    with pytest.raises(InvalidSpecError, match=r"6/3 query/KV heads are refused \(LlamaConfig: .*hidden size \(128\) "
                                               r"is not a multiple.*achievable fractions are 0 %, 50 %, 75 %"):
        prune_structured(narrow, StructuredConfig(heads=0.25))
    with pytest.raises(InvalidSpecError, match="blocks=2: the model has 2 blocks"):
        prune_structured(model, StructuredConfig(blocks=2, importance="random"))
    with pytest.raises(InvalidSpecError, match="mlp=0.001: removes 0 of 256"):
        prune_structured(model, StructuredConfig(mlp=0.001, importance="random"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # failed before any change
    for bad, match in ((dict(heads=1.0), r"heads must be a fraction in \[0, 1\)"), (dict(), "nothing to remove"),
                       (dict(mlp=0.5, importance="fisher"), "choose one of activation, magnitude, random"),
                       (dict(blocks=1, importance="magnitude"), "measured on data"), (dict(blocks=-1), "whole number")):
        with pytest.raises(InvalidSpecError, match=match):
            StructuredConfig(**bad)
    lowbit.quantize(model, lowbit.QuantSpec.int_(4, 32))
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.self_attn.q_proj: QuantLinear \(prune the float"):
        prune_structured(model, StructuredConfig(mlp=0.5, importance="random"))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256))
    with pytest.raises(UnsupportedModelError, match=r"transformer.h.0.self_attn.q_proj: missing; .*Llama-family"):
        prune_structured(gpt2, StructuredConfig(mlp=0.5, importance="random"))


def test_activation_importance_beats_random_on_the_built_in_lm() -> None:
    """Held-out perplexity after removing one KV group per layer and 25 % of the MLP: the data-driven choice
    is better than a random one (several seeds) and than weight magnitude."""
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    tok = load_tokenizer(lowbit.load("builtin:tiny-lm"))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))[:4096]
    ppl = {}
    for name, kwargs in (("activation", {}), ("magnitude", dict(importance="magnitude")),
                         *((f"random{s}", dict(importance="random", seed=s)) for s in range(3))):
        model = lowbit.load("builtin:tiny-lm")
        prune_structured(model, StructuredConfig(heads=0.5, mlp=0.25, **kwargs), tokenizer=tok,
                         calib=CalibConfig(samples=16, seq_len=128))
        ppl[name] = perplexity(model, ids).ppl
    assert ppl["activation"] < 0.9 * min(ppl[f"random{s}"] for s in range(3)), ppl
    assert ppl["activation"] < ppl["magnitude"], ppl


def test_distillation_recovers_half_of_the_structured_pruning_loss() -> None:
    """tiny-lm without one KV group per block and 25 % of its MLP (activation importance, 16 × 128 calibration
    tokens): held-out perplexity (first 4096 eval tokens, 128-token windows) rises from ~40 to ~80. 60 steps of
    DistillTrainer from the dense teacher (8 × 64 tokens of calib.txt a step, lr 1e-3 decaying linearly, forward KL
    + the hidden-state MSE of every block's output) win back at least half of that loss (measured: 59 %; 45 steps
    gave 54 %, 30 steps 48 %). bench/prune_structured.py has the longer runs."""
    from lowbit.compress.distill import DistillTrainer
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer
    from lowbit.train import TrainConfig, load_causal_lm_data

    teacher = lowbit.load("builtin:tiny-lm")
    tok = load_tokenizer(teacher)
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))[:4096]
    data = load_causal_lm_data(builtin_dir("tiny-lm") / "calib.txt", tok, 64)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, ids, seq_len=128, batch_size=16).ppl

    student = lowbit.load("builtin:tiny-lm")
    prune_structured(student, StructuredConfig(heads=0.5, mlp=0.25), tokenizer=tok,
                     calib=CalibConfig(samples=16, seq_len=128))
    dense, pruned = ppl(teacher), ppl(student)
    for p in student.parameters():
        p.requires_grad_(True)
    config = TrainConfig(steps=60, batch_size=8, lr=1e-3, seed=0, show_progress=False, log_every=60)
    DistillTrainer(student, config, data, teacher, hidden_weight=1.0).train()
    after = ppl(student)
    assert pruned > 1.5 * dense, (dense, pruned)  # the pruning costs something worth recovering
    assert dense < after and pruned - after >= 0.5 * (pruned - dense), (dense, pruned, after)


def test_cli_prune_quantize_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p"
    assert main(["prune", "builtin:tiny-lm", "--method", "structured", "--heads", "0.5", "--mlp", "0.25", "--blocks",
                 "1", "-o", str(out), "--calib-samples", "8", "--calib-seq-len", "64", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "structured" and report["heads"] == 0.5 and report["mlp"] == 0.25
    assert report["shape_after"] == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
                                     "intermediate_size": 576, "num_hidden_layers": 3}
    assert report["file_bytes"] == _st_bytes(out) and report["params_after"] < 0.7 * report["params_before"]
    assert len(report["per_layer"]) == 4 and len(report["removed_blocks"]) == 1
    pruned = lowbit.load(out)
    assert count_params(pruned) == report["params_after"]
    # quantize the pruned model (576 = 9 groups of 64) and export it as GGUF q8_0
    assert main(["quantize", str(out), "-o", str(tmp_path / "q"), "--group-size", "64", "--quiet"]) == 0
    quant = lowbit.load(tmp_path / "q")
    assert type(quant.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    gguf = tmp_path / "p.gguf"
    assert main(["export", str(out), "--format", "gguf", "--type", "q8_0", "-o", str(gguf), "--quiet"]) == 0
    back = lowbit.load(gguf)
    assert back.config.num_attention_heads == 2 and back.config.num_key_value_heads == 1
    ids = IDS % 1000
    with torch.no_grad():
        ref, q8, q4 = pruned(ids).logits, back(ids).logits, quant(ids).logits
    for other in (q8, q4):
        assert (other - ref).norm() < 0.1 * ref.norm()
    # --sparsity alone: heads = mlp = S; the structured flags are refused by the other methods
    assert main(["prune", "builtin:tiny-lm", "--method", "structured", "--sparsity", "0.5", "--importance",
                 "magnitude", "-o", str(tmp_path / "s"), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["heads"], report["mlp"], report["blocks"]) == (0.5, 0.5, 0)
    assert report["shape_after"]["intermediate_size"] == 384
    assert main(["prune", "builtin:tiny-lm", "--method", "wanda", "--heads", "0.5", "-o", str(tmp_path / "w"),
                 "--quiet"]) == 2
    assert "only with --method structured" in capsys.readouterr().err
    assert main(["prune", "builtin:tiny-lm", "--method", "structured", "--heads", "0.25", "-o", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "achievable fractions are 0 %, 50 %" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_lora_merge_keeps_the_pruning_mask() -> None:
    """Wanda 50 % → LoRA fine-tuned on every linear layer → merged: the zero pattern is unchanged (opt-out: lost)."""
    from lowbit.compress.prune import PruneConfig, prune_model
    from lowbit.peft import LoraConfig, apply_adapter
    from lowbit.peft.merge import merge, merge_and_unload, unmerge
    from lowbit.quantize import load_tokenizer

    model = lowbit.load("builtin:tiny-lm")
    prune_model(model, PruneConfig("wanda", 0.5), calib=CalibConfig(samples=8, seq_len=64),
                tokenizer=load_tokenizer(model))
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert all(abs(z.float().mean().item() - 0.5) < 0.01 for z in zeros.values())
    apply_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, ids, lr=1e-2, steps=3)
    assert losses[-1] < losses[0]
    report = merge(model, keep_sparsity=False)  # opt-out: the update fills the holes
    merged = {n: m.base_layer.weight for n, m in model.named_modules() if isinstance(m, lowbit.peft.AdapterLayer)}
    assert all((merged[n] == 0).float().mean() < 0.01 for n in zeros) and not report.masked_layers
    unmerge(model)
    model, report = merge_and_unload(model)
    assert len(report.masked_layers) == len(zeros) == 28 and report.to_dict()["sparsity_kept_layers"] == 28
    assert 0 < report.mean_delta_rel_error < 1  # the part of the update on pruned weights is dropped, the rest kept
    for name, zero in zeros.items():
        assert torch.equal(model.get_submodule(name).weight == 0, zero), name
