"""KL divergence / top-1 agreement, strided perplexity and multiple-choice tasks, against direct computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import CorruptFileError, InvalidSpecError, UnsupportedModelError
from lowbit.eval.kl import check_same_vocabulary, kl_divergence
from lowbit.eval.perplexity import Window, perplexity, text_windows, tokenize_text
from lowbit.eval.tasks import (ChoiceItem, build_cloze_tasks, encode_pair, evaluate_tasks, read_tasks,
                               score_choices)
from lowbit.models.resolve import builtin_dir
from lowbit.quantize import load_tokenizer

TINY = builtin_dir("tiny-lm")


@pytest.fixture(scope="module")
def float_lm() -> torch.nn.Module:
    return lowbit.load("builtin:tiny-lm")


@pytest.fixture(scope="module")
def int4_lm() -> torch.nn.Module:
    return lowbit.quantize(lowbit.load("builtin:tiny-lm"), lowbit.QuantSpec.int_(4, 128, symmetric=False))


@pytest.fixture(scope="module")
def tokenizer(float_lm: torch.nn.Module):
    return load_tokenizer(float_lm)


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return tokenize_text(tokenizer, (TINY / "eval.txt").read_text(encoding="utf-8"))[:700]  # [T]


@pytest.fixture
def small_text(tmp_path: Path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text((TINY / "eval.txt").read_text(encoding="utf-8")[:2500], encoding="utf-8")
    return path


def _run_json(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---- KL divergence -------------------------------------------------------------------------
@torch.no_grad()
def _direct_kl(model, reference, ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Per-token KL (float64), argmax agreement, and both NLL sums from full logits, one window at a time."""
    kls, agree, nll, ref_nll = [], [], 0.0, 0.0
    for start in range(0, ids.numel(), seq_len):
        window = ids[start : start + seq_len]
        if window.numel() < 2:
            continue
        logp = torch.log_softmax(model(input_ids=window[None]).logits[0, :-1].double(), -1)  # [L-1, V]
        logq = torch.log_softmax(reference(input_ids=window[None]).logits[0, :-1].double(), -1)
        kls.append((logq.exp() * (logq - logp)).sum(-1))
        agree.append(logp.argmax(-1) == logq.argmax(-1))
        nll -= logp.gather(-1, window[1:, None]).sum().item()
        ref_nll -= logq.gather(-1, window[1:, None]).sum().item()
    return torch.cat(kls), torch.cat(agree), nll, ref_nll


def test_kl_equals_full_logits_computation(int4_lm, float_lm, ids: torch.Tensor) -> None:
    result = kl_divergence(int4_lm, float_lm, ids, seq_len=128, batch_size=3)  # 5 full windows + one of 60
    kls, agree, nll, ref_nll = _direct_kl(int4_lm, float_lm, ids, 128)
    assert result.tokens == kls.numel() == 700 - 6 and result.windows == 6
    assert 1e-3 < result.kl < 1.0
    assert result.kl == pytest.approx(kls.mean().item(), abs=1e-6)
    assert result.top1_agreement == agree.double().mean().item()
    assert 0.5 < result.top1_agreement < 1.0
    assert result.kl_max == pytest.approx(kls.max().item(), abs=1e-5)
    assert result.kl_p99 == pytest.approx(torch.quantile(kls, 0.99).item(), abs=1e-5)
    assert result.kl_median == pytest.approx(torch.quantile(kls, 0.5).item(), abs=1e-6)
    assert result.ppl == pytest.approx(math.exp(nll / kls.numel()), rel=1e-6)
    assert result.reference_ppl == pytest.approx(math.exp(ref_nll / kls.numel()), rel=1e-6)
    assert result.reference_ppl == pytest.approx(perplexity(float_lm, ids, seq_len=128).ppl, rel=1e-6)


def test_kl_of_a_model_with_itself_is_zero(float_lm, ids: torch.Tensor) -> None:
    result = kl_divergence(float_lm, float_lm, ids[:300], seq_len=128)
    assert result.kl == 0.0 and result.kl_max == 0.0 and result.top1_agreement == 1.0
    assert result.ppl == result.reference_ppl


def test_kl_strided_scores_each_token_once(int4_lm, float_lm, ids: torch.Tensor) -> None:
    result = kl_divergence(int4_lm, float_lm, ids[:300], seq_len=128, stride=64)
    assert result.tokens == 299 and result.stride == 64 and result.kl > 0


def test_kl_needs_one_vocabulary(float_lm) -> None:
    class Wide(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 5000)})()

    with pytest.raises(UnsupportedModelError, match="same vocabulary"):
        kl_divergence(Wide(), float_lm, torch.arange(10), seq_len=8)

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    check_same_vocabulary(Tok({"a": 0, "b": 1}), Tok({"b": 1, "a": 0}), "m", "r")
    with pytest.raises(UnsupportedModelError, match="different tokenizers"):
        check_same_vocabulary(Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}), "m", "r")


# ---- strided perplexity --------------------------------------------------------------------
def test_stride_equal_to_seq_len_is_the_default(float_lm, ids: torch.Tensor) -> None:
    default = perplexity(float_lm, ids, seq_len=128, batch_size=4)
    strided = perplexity(float_lm, ids, seq_len=128, batch_size=4, stride=128)
    assert (strided.ppl, strided.tokens, strided.windows) == (default.ppl, default.tokens, default.windows)
    assert default.tokens == 700 - 6


@torch.no_grad()
def test_strided_perplexity_by_hand(float_lm, ids: torch.Tensor) -> None:
    assert text_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert text_windows(9, 4, 3) == [Window(0, 4, 1), Window(3, 7, 4), Window(6, 9, 7)]
    x = ids[:10]
    # window [a, b) scores targets [s, b) from its own logits
    nll = 0.0
    for a, b, s in ((0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)):
        logp = torch.log_softmax(float_lm(input_ids=x[None, a:b]).logits[0].double(), -1)  # [b-a, V]
        nll -= sum(logp[t - 1 - a, x[t]].item() for t in range(s, b))
    result = perplexity(float_lm, x, seq_len=4, stride=2, batch_size=2)
    assert result.tokens == 9 and result.windows == 4
    assert result.ppl == pytest.approx(math.exp(nll / 9), rel=1e-6)
    with pytest.raises(InvalidSpecError, match="stride"):
        perplexity(float_lm, x, seq_len=4, stride=5)


# ---- multiple-choice tasks -----------------------------------------------------------------
@torch.no_grad()
def test_multiple_choice_matches_hand_computation(float_lm, tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    lines = [{"context": "The module provides a simple way to", "choices": ["time small bits of code", "zebra"],
              "answer": 0, "task": "a"},
             {"query": "Return the ", "choices": ["value", "number of items", "x"], "gold": 2, "task": "b"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    items = read_tasks(path)
    assert items[1] == ChoiceItem("Return the ", ("value", "number of items", "x"), 2, "b")

    def by_hand(context: str, choice: str) -> float:  # lm-eval: trailing spaces move into the continuation
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + " " + choice
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx)] == ctx
        logp = torch.log_softmax(float_lm(input_ids=torch.tensor([whole])).logits[0].double(), -1)
        return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))

    expected = [[by_hand(item.context, c) for c in item.choices] for item in items]
    for batch_size in (1, 5):
        got = score_choices(float_lm, tokenizer, items, batch_size=batch_size)
        for row, want in zip(got, expected):
            assert row == pytest.approx(want, abs=1e-5)
    result = evaluate_tasks(float_lm, tokenizer, items, batch_size=2)
    acc = [float(max(range(len(ll)), key=ll.__getitem__) == item.answer) for ll, item in zip(expected, items)]
    norm = [float(max(range(len(ll)), key=lambda j: ll[j] / len(item.choices[j])) == item.answer)
            for ll, item in zip(expected, items)]
    assert result.overall.acc == sum(acc) / 2 and result.overall.acc_norm == sum(norm) / 2
    p = result.overall.acc
    assert result.overall.acc_stderr == pytest.approx(math.sqrt(p * (1 - p) / (2 - 1)))
    assert result.overall.n == 2 and result.overall.chance == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert set(result.tasks) == {"a", "b"} and result.tasks["a"].n == 1 and result.tasks["a"].acc_stderr is None


def test_encode_pair_follows_lm_eval(tokenizer) -> None:
    ctx, cont = encode_pair(tokenizer, "Return the ", " value")
    assert ctx == tokenizer("Return the", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tokenizer("Return the  value", add_special_tokens=False)["input_ids"]
    ctx, cont = encode_pair(tokenizer, "", " value")
    assert ctx == [tokenizer.bos_token_id] and cont == tokenizer(" value", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("line, match", [
    ('{"context": "a", "choices": ["x", "y"], "answer": 0', ":2: invalid JSON"),
    ('["a"]', ":2: expected a JSON object"),
    ('{"prompt": "a", "choices": ["x", "y"], "answer": 0}', ":2: no field of context / query / question"),
    ('{"context": "a", "query": "b", "choices": ["x", "y"], "answer": 0}', ":2: more than one field"),
    ('{"context": "a", "choices": ["x"], "answer": 0}', ":2: 'choices' must be a list of at least 2"),
    ('{"context": "a", "options": ["x", "y"], "answer": 0}', r":2: 'choices' .*fields: answer, context, options"),
    ('{"context": "a", "choices": ["x", "y"], "answer": 2}', ":2: the answer must be an integer index"),
    ('{"context": "a", "choices": ["x", "y"], "label": true}', ":2: the answer must be an integer index"),
    ('{"context": 3, "choices": ["x", "y"], "answer": 0}', ":2: the context must be a string"),
    ('{"context": "a", "choices": ["x", "y"], "answer": 0, "task": 1}', ":2: 'task' must be"),
])
def test_malformed_task_lines_are_named(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "ok", "choices": ["x", "y"], "answer": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorruptFileError, match=match):
        read_tasks(path)


def test_empty_or_missing_task_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(InvalidSpecError, match="no task items"):
        read_tasks(tmp_path / "empty.jsonl")
    assert main(["eval", "builtin:tiny-lm", "--tasks", str(tmp_path / "missing.jsonl"), "--quiet"]) == 2
    assert "task file not found" in capsys.readouterr().err


def test_builtin_task_file_is_the_cloze_build_of_eval_text() -> None:
    items = read_tasks(TINY / "tasks.jsonl")
    records = build_cloze_tasks((TINY / "eval.txt").read_text(encoding="utf-8"))
    assert 50 <= len(items) <= 100 and len(records) == len(items)
    assert [ChoiceItem(r["context"], tuple(r["choices"]), r["answer"], r["task"]) for r in records] == items
    assert {item.task for item in items} == {"next-word", "next-phrase"}
    assert all(len(item.choices) == 4 for item in items)


# ---- the CLI -------------------------------------------------------------------------------
def test_cli_tasks_builtin(capsys: pytest.CaptureFixture) -> None:
    e = _run_json(["eval", "builtin:tiny-lm", "--tasks", "--json", "--quiet"], capsys)
    assert set(e) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "chance", "tasks", "params"}
    assert e["chance"] == 0.25 and e["acc"] > 0.45 and e["acc_norm"] > 0.45  # chance is 0.25
    assert set(e["tasks"]) == {"next-word", "next-phrase"}
    assert sum(t["n"] for t in e["tasks"].values()) == e["n"]


def test_cli_kl_and_strided_ppl(small_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q4"
    assert main(["quantize", "builtin:tiny-lm", "--bits", "4", "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    e = _run_json(["eval", str(out), "--kl", "--kl-text", str(small_text), "--ppl", str(small_text), "--seq-len", "128",
                   "--stride", "64", "--json", "--quiet"], capsys)
    assert set(e) >= {"kl", "kl_median", "kl_p99", "kl_max", "top1_agreement", "kl_tokens", "kl_ppl",
                      "kl_reference_ppl", "ppl", "tokens", "seq_len", "stride", "bits_per_weight"}
    assert e["kl_reference"] == "builtin:tiny-lm" and e["stride"] == 64 and e["seq_len"] == 128
    assert 0 < e["kl_median"] <= e["kl"] <= e["kl_p99"] <= e["kl_max"]  # the KL of a token is long-tailed
    assert 0.5 < e["top1_agreement"] < 1 and e["kl_tokens"] == e["tokens"]
    assert e["kl_ppl"] == pytest.approx(e["ppl"], rel=1e-4)
    assert main(["eval", "builtin:tiny-lm", "--stride", "64", "--quiet"]) == 2
    assert "--stride applies to --ppl and --kl" in capsys.readouterr().err
    assert main(["eval", "builtin:tiny-lm", "--kl", "--quiet"]) == 2
    assert "--kl needs a REFERENCE" in capsys.readouterr().err


def test_cli_kl_of_a_gguf_file(small_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "x.gguf"
    assert main(["export", "builtin:tiny-lm", "--type", "q8_0", "-o", str(gguf), "--quiet"]) == 0
    capsys.readouterr()
    e = _run_json(["eval", str(gguf), "--kl", "builtin:tiny-lm", "--kl-text", str(small_text), "--json", "--quiet"],
                  capsys)
    assert 0 < e["kl"] < 0.01 and e["top1_agreement"] > 0.95 and e["kl_tokens"] > 400


def test_kl_refuses_other_tokenizers(tmp_path: Path, small_text: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (other / name).write_bytes((TINY / name).read_bytes())
    tok = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, different mapping
    (other / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    assert main(["eval", "builtin:tiny-lm", "--kl", str(other), "--kl-text", str(small_text), "--quiet"]) == 2
    assert "different tokenizers" in capsys.readouterr().err
