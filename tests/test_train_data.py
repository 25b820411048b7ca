"""lowbit.train.data: text/JSONL/chat loaders, masks, typed errors, eval split, classification data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.train import DataError, DataNotFoundError, load_causal_lm_data, load_classification_data, split_eval
from lowbit.train.data import IGNORE_INDEX

from test_train_support import tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_file_and_directory_windows(tmp_path: Path) -> None:
    tok = tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(text)
    (tmp_path / "docs" / "b.txt").write_text(text)
    one = load_causal_lm_data(tmp_path / "docs" / "a.txt", tok, 16)
    n_tokens = len(tok(text)["input_ids"]) + 1  # + eos
    assert len(one) == n_tokens // 16
    both = load_causal_lm_data(tmp_path / "docs", tok, 16)
    assert len(both) == 2 * n_tokens // 16
    row = both[0]
    assert row["input_ids"].shape == (16,) and row["input_ids"].dtype == torch.long
    assert torch.equal(row["labels"], row["input_ids"]) and row["attention_mask"].all()


def test_jsonl_text_records_pad_and_truncate(tmp_path: Path) -> None:
    tok = tokenizer()
    path = _jsonl(tmp_path / "t.jsonl", {"text": "hello world"}, {"text": "a much longer text " * 20}, "")
    data = load_causal_lm_data(path, tok, 12)
    assert len(data) == 2
    ids = tok("hello world")["input_ids"] + [tok.eos_token_id]
    k = len(ids)
    assert data[0]["input_ids"][:k].tolist() == ids and (data[0]["input_ids"][k:] == tok.pad_token_id).all()
    assert data[0]["attention_mask"].tolist() == [1] * k + [0] * (12 - k)
    assert data[0]["labels"][:k].tolist() == ids and (data[0]["labels"][k:] == IGNORE_INDEX).all()
    assert data[1]["attention_mask"].all()
    custom = load_causal_lm_data(_jsonl(tmp_path / "c.jsonl", {"body": "hello world"}), tok, 12, field="body")
    assert torch.equal(custom[0]["input_ids"], data[0]["input_ids"])


def test_prompt_response_masks_the_prompt(tmp_path: Path) -> None:
    tok = tokenizer()
    path = _jsonl(tmp_path / "pr.jsonl", {"prompt": "What is a list?", "response": "A sequence."})
    data = load_causal_lm_data(path, tok, 32)
    prompt = tok("What is a list?")["input_ids"]
    response = tok("A sequence.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prompt) + len(response)
    assert data[0]["input_ids"][:n].tolist() == prompt + response
    assert data[0]["labels"][:n].tolist() == [IGNORE_INDEX] * len(prompt) + response
    assert (data[0]["labels"][n:] == IGNORE_INDEX).all()


def test_chat_messages_loss_on_assistant_turns_only(tmp_path: Path) -> None:
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "See you"}]
        data = load_causal_lm_data(_jsonl(tmp_path / "chat.jsonl", {"messages": messages}), tok, 64)
    finally:
        tok.chat_template = None
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    kept = ids[labels != IGNORE_INDEX]
    text = tok.decode(kept)
    assert "Hello friend" in text and "See you" in text
    assert "Hi there" not in text and "Be brief" not in text and "Bye" not in text
    assert data[0]["attention_mask"].sum() < 64


def test_chat_without_template_is_a_typed_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "chat.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*chat_template"):
        load_causal_lm_data(path, tokenizer(), 16)


def test_missing_field_names_file_line_and_fields(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", {"text": "fine"}, {"prompt": "q", "answer": "a"})
    with pytest.raises(DataError, match=r"d\.jsonl:2: record has no field 'response' \(its fields: answer, prompt\)"):
        load_causal_lm_data(path, tokenizer(), 16)
    with pytest.raises(DataError, match=r"d\.jsonl:1: record has no field 'body' \(its fields: text\)"):
        load_causal_lm_data(path, tokenizer(), 16, field="body")
    odd = _jsonl(tmp_path / "e.jsonl", {"content": "x"})
    with pytest.raises(DataError, match=r"e\.jsonl:1: record has none of the fields.*its fields: content"):
        load_causal_lm_data(odd, tokenizer(), 16)


def test_bad_json_missing_file_and_empty_data(tmp_path: Path) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", {"text": "ok"}, "", "{not json")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_causal_lm_data(bad, tokenizer(), 16)
    with pytest.raises(DataNotFoundError, match="nope.txt"):
        load_causal_lm_data(tmp_path / "nope.txt", tokenizer(), 16)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_causal_lm_data(empty, tokenizer(), 16)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(DataError, match=r"short\.txt: \d+ tokens, fewer than one window of seq_len=64"):
        load_causal_lm_data(short, tokenizer(), 64)
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        load_causal_lm_data(tmp_path / "nodocs", tokenizer(), 16)


def test_split_eval_is_deterministic(tmp_path: Path) -> None:
    from lowbit.train import TokenDataset

    data = TokenDataset({"input_ids": torch.arange(20).view(10, 2), "labels": torch.arange(10)})
    train, ev = split_eval(data, 0.3, seed=1)
    train2, ev2 = split_eval(data, 3, seed=1)
    assert len(train) == 7 and len(ev) == 3 and torch.equal(ev.tensors["labels"], ev2.tensors["labels"])
    assert sorted(train.tensors["labels"].tolist() + ev.tensors["labels"].tolist()) == list(range(10))
    assert not torch.equal(split_eval(data, 3, seed=2)[1].tensors["labels"], ev.tensors["labels"])
    with pytest.raises(DataError):
        split_eval(data, 10)


def test_classification_labels(tmp_path: Path) -> None:
    tok = tokenizer()
    ints = _jsonl(tmp_path / "i.jsonl", {"text": "a b", "label": 2}, {"text": "c", "label": 0})
    data, names = load_classification_data(ints, tok, 8)
    assert names == ["0", "1", "2"] and data.tensors["labels"].tolist() == [2, 0]
    assert data.tensors["input_ids"].shape == (2, 8) and data.tensors["attention_mask"][1].sum() < 8
    strs = _jsonl(tmp_path / "s.jsonl", {"sentence": "x", "y": "spam"}, {"sentence": "y", "y": "ham"})
    data, names = load_classification_data(strs, tok, 8, text_field="sentence", label_field="y")
    assert names == ["ham", "spam"] and data.tensors["labels"].tolist() == [1, 0] and data.label_names == names
    with pytest.raises(DataError, match=r"s\.jsonl:1: label 'spam' is not one of"):
        load_classification_data(strs, tok, 8, text_field="sentence", label_field="y", label_names=["ham", "eggs"])
    with pytest.raises(DataError, match=r"s\.jsonl:1: record has no field 'text'"):
        load_classification_data(strs, tok, 8)
