"""Knowledge distillation: the top-k loss, the teacher cache, resume, errors, the CLI, and what KD buys on tiny-lm."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.compress.distill import (DistillTrainer, LogitCache, RowIndexed, TeacherCacheError, build_logit_cache,
                                     check_same_tokenizer, evenly_spaced, kl_full, kl_topk, parse_layer_map,
                                     student_from_config)
from lowbit.errors import CorruptFileError, InvalidSpecError
from lowbit.models.resolve import builtin_dir
from lowbit.quantize import load_tokenizer
from lowbit.train import TrainConfig, Trainer, load_causal_lm_data

SMALL = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32}  # a narrow 1-block student of tiny-lm (hidden 256)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return lowbit.load("builtin:tiny-lm")


@pytest.fixture(scope="module")
def tokenizer(teacher):
    return load_tokenizer(teacher)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distill-data") / "train.txt"
    path.write_text((builtin_dir("tiny-lm") / "calib.txt").read_text()[:6000])
    return path


@pytest.fixture(scope="module")
def data(text_file, tokenizer):
    return load_causal_lm_data(text_file, tokenizer, 32)


def _topk(t: torch.Tensor, k: int, temp: float = 1.0):
    logp = F.log_softmax(t / temp, -1)
    values, index = logp.topk(k, -1)
    return values, index, logp.scatter(-1, index, float("-inf")).logsumexp(-1)


# ---- the loss --------------------------------------------------------------------------------------

def test_topk_loss_by_hand_and_equal_to_full_kl_at_full_k():
    # 3 tokens, k = 1: buckets {0} and {1, 2}, written out by hand
    t, s = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.5]])
    p0 = math.exp(2) / (math.exp(2) + math.exp(1) + 1)
    q0 = 1 / (1 + math.exp(1) + math.exp(0.5))
    forward = p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / (1 - q0))
    reverse = q0 * math.log(q0 / p0) + (1 - q0) * math.log((1 - q0) / (1 - p0))
    assert float(kl_topk(s, *_topk(t, 1), 1.0, "forward")) == pytest.approx(forward, rel=1e-5)
    assert float(kl_topk(s, *_topk(t, 1), 1.0, "reverse")) == pytest.approx(reverse, rel=1e-5)

    gen = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(6, 40, generator=gen), 3 * torch.randn(6, 40, generator=gen)
    for kl in ("forward", "reverse"):
        for temp in (1.0, 2.5):
            full = float(kl_full(s, t, temp, kl))
            assert float(kl_topk(s, *_topk(t, 40, temp), temp, kl)) == pytest.approx(full, rel=1e-5)
            assert 0 < float(kl_topk(s, *_topk(t, 8, temp), temp, kl)) < full  # bucketing only loses information
    # gradients stay finite when the rest bucket is empty (k = V) in both directions
    s.requires_grad_(True)
    (kl_topk(s, *_topk(t, 40), 1.0, "forward") + kl_topk(s, *_topk(t, 40), 1.0, "reverse")).backward()
    assert torch.isfinite(s.grad).all()


def test_cached_trainer_loss_equals_live_loss_at_full_k(teacher, data, tmp_path):
    rows = torch.arange(3)
    sub = data.subset(rows)
    student = student_from_config(teacher, {"num_hidden_layers": 2}, init="teacher")
    cache = build_logit_cache(teacher, sub, tmp_path / "c.safetensors", k=4096, temperature=2.0,
                              value_dtype=torch.float32, show_progress=False)
    batch = RowIndexed(sub).batch(rows)
    batch["labels"][0, :5] = -100
    for kl, alpha in (("forward", 1.0), ("reverse", 0.7)):
        live = DistillTrainer(student, TrainConfig(steps=1, show_progress=False), sub, teacher, temperature=2.0,
                              alpha=alpha, kl=kl)
        cached = DistillTrainer(student, TrainConfig(steps=1, show_progress=False), sub, None, temperature=2.0,
                                alpha=alpha, kl=kl, cache=cache)
        got, want = cached._loss_sum(student, batch).detach(), live._loss_sum(student, batch).detach()
        assert float(got) == pytest.approx(float(want), rel=1e-4)


def test_hidden_state_loss_and_layer_maps(teacher, data):
    batch = data.batch(torch.arange(2))
    twin = student_from_config(teacher, {}, init="teacher")  # all 4 blocks copied: the teacher itself
    tr = DistillTrainer(twin, TrainConfig(steps=1, show_progress=False), data, teacher, hidden_weight=1.0)
    assert tr.layer_map == {1: 1, 2: 2, 3: 3, 4: 4}
    assert float(tr._loss_sum(twin, batch)) == pytest.approx(0.0, abs=1e-3)
    narrow = student_from_config(teacher, SMALL, init="random")
    tr = DistillTrainer(narrow, TrainConfig(steps=1, show_progress=False), data, teacher, hidden_weight=0.5,
                        layer_map={1: 4})
    assert tr.named["distill_projection.1.weight"].shape == (256, 64)  # learned P: width 64 → 256
    assert float(tr._loss_sum(narrow, batch)) > float(
        DistillTrainer(narrow, TrainConfig(steps=1, show_progress=False), data, teacher)._loss_sum(narrow, batch))
    with pytest.raises(InvalidSpecError, match="hidden-state indices"):
        DistillTrainer(narrow, TrainConfig(steps=1), data, teacher, hidden_weight=1.0, layer_map={2: 1})
    assert parse_layer_map("1:2, 2:4") == {1: 2, 2: 4} and evenly_spaced(2, 4) == [0, 3]
    with pytest.raises(InvalidSpecError, match="STUDENT:TEACHER"):
        parse_layer_map("1-2")


# ---- the cache ---------------------------------------------------------------------------------------

def test_cache_round_trip_and_mismatch_errors(teacher, data, tokenizer, text_file, tmp_path):
    path = tmp_path / "run" / "topk.safetensors"
    cache = build_logit_cache(teacher, data, path, k=16, temperature=1.5, batch_size=5, show_progress=False)
    assert not list(path.parent.glob(".*"))  # the temp file was renamed away
    reopened = LogitCache(path)
    reopened.check(data, k=16, temperature=1.5, vocab=4096)
    rows = torch.tensor([7, 0, len(data) - 1])  # across chunks of 5 rows, and the short last chunk
    logp, index, rest = reopened.rows(rows)
    with torch.no_grad():
        want = F.log_softmax(teacher(input_ids=data.batch(rows)["input_ids"]).logits[:, :-1] / 1.5, -1)
    assert logp.shape == index.shape == (3, 31, 16) and rest.shape == (3, 31)
    assert torch.allclose(logp, want.gather(-1, index), atol=2e-2)  # stored as float16
    assert torch.equal(index[..., 0], want.argmax(-1))
    assert torch.allclose(rest.exp() + want.gather(-1, index).exp().sum(-1), torch.ones(3, 31), atol=1e-4)
    assert cache.k == 16 and cache.rows_total == len(data)

    other = load_causal_lm_data(text_file, tokenizer, 16)
    with pytest.raises(TeacherCacheError, match="rows × seq_len"):
        reopened.check(other)
    shuffled = data.subset(torch.arange(len(data)).flip(0))
    with pytest.raises(TeacherCacheError, match="fingerprint"):
        reopened.check(shuffled)
    with pytest.raises(TeacherCacheError, match="k 16 vs 32"):
        reopened.check(data, k=32)
    with pytest.raises(TeacherCacheError, match="temperature"):
        DistillTrainer(student_from_config(teacher, SMALL), TrainConfig(steps=1), data, None, cache=reopened)
    with pytest.raises(TeacherCacheError, match="vocabulary 4096 vs the student's 4000"):
        reopened.check(data, vocab=4000)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError):
        LogitCache(broken)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CorruptFileError, match="not a lowbit teacher cache"):
        LogitCache(tmp_path / "plain.safetensors")
    with pytest.raises(TeacherCacheError, match="not found"):
        LogitCache(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidSpecError, match="k must lie"):
        build_logit_cache(teacher, data, tmp_path / "x.safetensors", k=5000, show_progress=False)


def test_vocab_and_tokenizer_mismatch_errors(teacher, tokenizer, data):
    with pytest.raises(InvalidSpecError, match="vocab_size 4000 differs"):
        student_from_config(teacher, {"vocab_size": 4000})
    with pytest.raises(InvalidSpecError, match="equal widths"):
        student_from_config(teacher, SMALL, init="teacher")
    import transformers

    cfg = transformers.LlamaConfig(**{**teacher.config.to_dict(), "vocab_size": 4000, "num_hidden_layers": 1})
    other_vocab = transformers.LlamaForCausalLM(cfg)
    tr = DistillTrainer(other_vocab, TrainConfig(steps=1, show_progress=False), data, teacher)
    with pytest.raises(InvalidSpecError, match="vocabularies differ"):
        tr._loss_sum(other_vocab, data.batch(torch.arange(1)))
    other_tok = load_tokenizer(teacher)
    other_tok.add_tokens(["<lowbit-extra>"])
    with pytest.raises(InvalidSpecError, match="tokenizers of"):
        check_same_tokenizer(tokenizer, other_tok, "teacher", "student")
    check_same_tokenizer(tokenizer, load_tokenizer(teacher), "teacher", "student")


# ---- resume ------------------------------------------------------------------------------------------

class _Crash:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, record):
        if record["step"] == self.step:  # after step 3's update, before its checkpoint: a kill
            raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["cached", "hidden"])
def test_resume_gives_identical_parameters(teacher, data, tmp_path, mode):
    cache = build_logit_cache(teacher, data, tmp_path / "c.safetensors", k=32, temperature=2.0, show_progress=False) \
        if mode == "cached" else None

    def run(out: Path, callbacks=(), resume=False) -> dict[str, torch.Tensor]:
        student = student_from_config(teacher, SMALL, init="random", seed=1)
        config = TrainConfig(steps=5, batch_size=4, lr=3e-3, checkpoint_every=1, log_every=1, out_dir=out,
                             resume=resume, show_progress=False, plot=False)
        kwargs = {"cache": cache} if mode == "cached" else {"hidden_weight": 0.1, "layer_map": {1: 2}}
        tr = DistillTrainer(student, config, data, None if cache else teacher, temperature=2.0, callbacks=callbacks,
                            **kwargs)
        tr.train()
        return {n: p.detach().clone() for n, p in tr.named.items()}

    reference = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", [_Crash(3)])
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.keys() == reference.keys() and (mode != "hidden" or "distill_projection.1.weight" in resumed)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


# ---- the command line --------------------------------------------------------------------------------

def _cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    from lowbit.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, json.loads(lines[-1]) if rc == 0 and lines else None, err


def test_cli_end_to_end(capsys, teacher, text_file, tmp_path):
    import transformers

    eval_file = tmp_path / "eval.txt"
    eval_file.write_text((builtin_dir("tiny-lm") / "eval.txt").read_text()[:3000])
    spec = tmp_path / "student.json"
    spec.write_text(json.dumps({"num_hidden_layers": 2}))
    out = tmp_path / "out"
    args = ["distill", "builtin:tiny-lm", "--student", str(spec), "--data", str(text_file), "--eval-data",
            str(eval_file), "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--top-k", "16", "--lr", "1e-3",
            "-o", str(out), "--json", "--quiet"]
    rc, report, err = _cli(capsys, *args)
    assert rc == 0, err
    assert report["steps"] == 4 and report["student_kind"] == "config" and report["cache"]["built"]
    ppl = report["ppl"]
    assert ppl["teacher"] < ppl["student_after"] < ppl["student_before"]
    assert report["tokens_per_s"] > 0 and report["seconds"] > 0 and math.isfinite(report["final_loss"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.csv", "lowbit_distill.json",
                 "teacher_topk.safetensors", "checkpoint"):
        assert (out / name).exists(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    saved = lowbit.load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.config.num_hidden_layers == 2
    tok = load_tokenizer(saved)
    from lowbit.train.trainer import eval_loss

    held = load_causal_lm_data(eval_file, tok, 32)
    assert eval_loss(saved, held) == pytest.approx(math.log(ppl["student_after"]), rel=1e-5)
    ids = held.tensors["input_ids"][:2]
    assert torch.allclose(saved(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-4)

    rc, again, err = _cli(capsys, *args, "--resume")  # finished run: resumes at step 4, reuses the cache
    assert rc == 0, err
    assert not again["cache"]["built"] and again["ppl"]["student_after"] == pytest.approx(ppl["student_after"])
    rc, _, err = _cli(capsys, *args)
    assert rc == 2 and "already exists" in err
    rc, _, err = _cli(capsys, *args[:-4], "--top-k", "8", "-o", str(out), "--resume", "--quiet")
    assert rc == 2 and "does not match" in err and "k 16 vs 8" in err

    other = tmp_path / "other-tok"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("checkpoint", "*.csv", "*.jsonl", "teacher_topk*"))
    extra = load_tokenizer(saved)
    extra.add_tokens(["<lowbit-extra>"])
    extra.save_pretrained(str(other))
    rc, _, err = _cli(capsys, "distill", "builtin:tiny-lm", "--student", str(other), "--data", str(text_file),
                      "--steps", "1", "--seq-len", "32", "-o", str(tmp_path / "x"), "--quiet")
    assert rc == 2 and "tokenizers of" in err
    spec.write_text("{not json")
    rc, _, err = _cli(capsys, *args[:-3], str(tmp_path / "y"), "--quiet")
    assert rc == 2 and "not a JSON config" in err


def test_cli_quantized_student_trains_its_float_parameters(capsys, teacher, text_file, tmp_path):
    quantized = lowbit.quantize(lowbit.load("builtin:tiny-lm"), lowbit.QuantSpec.int_(4, 32, symmetric=False))
    lowbit.save(quantized, tmp_path / "q")
    rc, report, err = _cli(capsys, "distill", "builtin:tiny-lm", "--student", str(tmp_path / "q"), "--data",
                           str(text_file), "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-3",
                           "-o", str(tmp_path / "out"), "--json", "--quiet")
    assert rc == 0, err
    assert report["student_kind"] == "quantized" and "float parameters" in report["note"]
    assert 0 < report["trainable_params"] < sum(p.numel() for p in teacher.parameters())
    assert lowbit.load(tmp_path / "out").lowbit_method


# ---- what distillation buys on the built-in LM ------------------------------------------------------

def _half_depth_runs(teacher, tokenizer, steps: int, variants) -> dict[str, float]:
    """Held-out perplexity (eval.txt, 128-token windows) of 2-block students after ``steps`` steps."""
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text

    data = load_causal_lm_data(builtin_dir("tiny-lm") / "calib.txt", tokenizer, 128)
    ids = tokenize_text(tokenizer, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    result = {"teacher": perplexity(teacher, ids, seq_len=128, batch_size=16).ppl}
    for init, loss in variants:
        student = student_from_config(teacher, {"num_hidden_layers": 2}, init=init, seed=0)
        config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, show_progress=False, log_every=steps)
        if loss == "kd":
            DistillTrainer(student, config, data, teacher).train()
        else:
            Trainer(student, config, data).train()
        result[f"{init}+{loss}"] = perplexity(student, ids, seq_len=128, batch_size=16).ppl
    return result


def test_distilled_half_depth_student_beats_scratch(teacher, tokenizer):
    """12 steps of 8 × 128 tokens: teacher-init + KD beats random-init + CE by far (and stays above the teacher)."""
    ppl = _half_depth_runs(teacher, tokenizer, 12, [("random", "ce"), ("teacher", "kd")])
    assert ppl["teacher"] < ppl["teacher+kd"] < 0.5 * ppl["random+ce"], ppl


@pytest.mark.slow
def test_kd_beats_ce_from_either_init(teacher, tokenizer):
    """100 steps: KD beats CE from the same init — from the teacher's blocks and from scratch."""
    ppl = _half_depth_runs(teacher, tokenizer, 100, [("random", "ce"), ("random", "kd"), ("teacher", "ce"),
                                                     ("teacher", "kd")])
    assert ppl["teacher+kd"] < ppl["teacher+ce"] < ppl["random+kd"] < ppl["random+ce"], ppl
