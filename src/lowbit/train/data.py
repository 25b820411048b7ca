"""Training data → fixed-shape examples: ``input_ids``, ``attention_mask``, ``labels`` (LongTensors).

Causal LM examples are ``[seq_len]`` rows whose ``labels`` equal ``input_ids`` where the loss
counts and ``-100`` elsewhere (prompt tokens, padding, non-assistant chat turns); the trainer shifts
them itself. Classification examples carry one class id per row (``labels: [N]``).

Sources (:func:`load_causal_lm_data`):

- a plain text file or a directory of ``.txt`` files: all tokens concatenated (each file followed by
  eos) and cut into ``seq_len`` windows, loss on every token (the remainder is dropped);
- a ``.jsonl`` file, one example per record, truncated/padded to ``seq_len``:
  ``{"text": ...}`` (or the field named by ``field``) — loss on every token;
  ``{"prompt": ..., "response": ...}`` — loss on the response (+ eos) only;
  ``{"messages": [{"role": ..., "content": ...}, ...]}`` — rendered with the tokenizer's chat
  template, loss on the assistant turns only.
"""

from __future__ import annotations

import bisect
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lowbit.io.jsonl import iter_jsonl
from lowbit.train.errors import DataError, DataNotFoundError

IGNORE_INDEX = -100
MAX_CLASSES = 1 << 16  # integer class ids above this are refused (they would name max+1 classes)
TEXT_SUFFIXES = (".txt", ".md", ".rst")


class TokenDataset:
    """Examples stored as stacked tensors (``name → [N, ...]`` LongTensors, all with the same N).

    ``dataset[i]`` is one example (a dict of tensors), ``dataset.batch(indices)`` stacks several.
    ``label_names`` holds the class names of a classification dataset (index = class id).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], label_names: list[str] | None = None) -> None:
        sizes = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors of different lengths: {sizes}")
        self.tensors = tensors
        self.label_names = label_names

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {name: t.index_select(0, idx) for name, t in self.tensors.items()}

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "TokenDataset":
        return TokenDataset(self.batch(indices), self.label_names)


def split_eval(dataset: TokenDataset, size: float | int, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
    """Deterministic held-out split → ``(train, eval)``.

    ``size``: a fraction in (0, 1) or a number of examples (int ≥ 1). The same ``seed`` always picks
    the same eval examples; both parts keep the original order.
    """
    n = len(dataset)
    n_eval = int(round(n * size)) if isinstance(size, float) and 0 < size < 1 else int(size)
    if isinstance(size, float) and not 0 < size < 1:
        raise DataError(f"split_eval: a fraction must lie in (0, 1), got {size}")
    if not 1 <= n_eval < n:
        raise DataError(f"split_eval: cannot hold out {n_eval} of {n} examples (need 1 ≤ eval < {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    is_eval = torch.zeros(n, dtype=torch.bool)
    is_eval[perm[:n_eval]] = True
    return dataset.subset(torch.nonzero(~is_eval).flatten()), dataset.subset(torch.nonzero(is_eval).flatten())


# ---- reading files --------------------------------------------------------------------------------

def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataNotFoundError(f"{path}: training data not found")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line; bad JSON names the file and line."""
    _check_exists(path)
    yield from iter_jsonl(path, DataError)


def _field(record: dict[str, Any], name: str, path: Path, line_no: int, kind: type | tuple[type, ...] = str) -> Any:
    if name not in record:
        raise DataError(f"{path}:{line_no}: record has no field {name!r} (its fields: {_fields(record)})")
    value = record[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{path}:{line_no}: field {name!r} should be {want}, got {type(value).__name__}")
    return value


def _fields(record: dict[str, Any]) -> str:
    return ", ".join(sorted(record)) or "none"


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def pad_id(tokenizer: Any) -> int:
    """Padding token id: the tokenizer's pad, else eos, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _stack(rows: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> TokenDataset:
    """``(ids, labels)`` rows → a dataset, each truncated to ``seq_len`` and right-padded."""
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        k = min(len(ids), seq_len)
        input_ids[i, :k] = torch.tensor(ids[:k], dtype=torch.long)
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.tensor(labs[:k], dtype=torch.long)
    return TokenDataset({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


# ---- causal LM ------------------------------------------------------------------------------------

def load_causal_lm_data(path: str | Path, tokenizer: Any, seq_len: int, *, field: str | None = None,
                        prompt_field: str = "prompt", response_field: str = "response",
                        messages_field: str = "messages") -> TokenDataset:
    """Read text/JSONL training data into ``[N, seq_len]`` causal-LM examples (see the module docstring).

    A JSONL record is read by the first rule that fits: ``field`` if given (then it is required);
    else ``text``; else ``prompt_field`` + ``response_field``; else ``messages_field``. A record
    matching none raises :class:`DataError` naming the file, line and the fields it has.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    path = Path(path)
    _check_exists(path)
    if path.suffix == ".jsonl":
        return _jsonl_examples(path, tokenizer, seq_len, field, prompt_field, response_field, messages_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(TEXT_SUFFIXES)} files")
    else:
        files = [path]
    tokens: list[int] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if text.strip():
            tokens += _encode(tokenizer, text, special=True) + _eos(tokenizer)
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(f"{path}: {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
    ids = torch.tensor(tokens[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})


def _jsonl_examples(path: Path, tokenizer: Any, seq_len: int, field: str | None, prompt_field: str,
                    response_field: str, messages_field: str) -> TokenDataset:
    rows: list[tuple[list[int], list[int]]] = []
    no_loss = 0
    for line_no, record in read_jsonl(path):
        if field is not None or "text" in record:
            ids = _encode(tokenizer, _field(record, field or "text", path, line_no), special=True) + _eos(tokenizer)
            labels = list(ids)
        elif prompt_field in record or response_field in record:
            prompt = _encode(tokenizer, _field(record, prompt_field, path, line_no), special=True)
            response = _encode(tokenizer, _field(record, response_field, path, line_no), special=False)
            response += _eos(tokenizer)
            ids, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + response
        elif messages_field in record:
            ids, labels = chat_example(tokenizer, _field(record, messages_field, path, line_no, list), path, line_no,
                                       max_tokens=seq_len)
        else:
            raise DataError(f"{path}:{line_no}: record has none of the fields 'text', {prompt_field!r}/"
                            f"{response_field!r} or {messages_field!r} (its fields: {_fields(record)})")
        if all(label == IGNORE_INDEX for label in labels[:seq_len]):
            no_loss += 1
        rows.append((ids, labels))
    if not rows:
        raise DataError(f"{path}: no examples (the file holds no records)")
    if no_loss:
        warnings.warn(f"{path}: {no_loss} of {len(rows)} examples have no loss tokens within seq_len={seq_len} "
                      "(prompt too long?); they add nothing to training", stacklevel=3)
    return _stack(rows, seq_len, pad_id(tokenizer))


def chat_example(tokenizer: Any, messages: list[Any], path: Path | str = "<messages>",
                 line_no: int = 0, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Render ``messages`` with the tokenizer's chat template → ``(ids, labels)``, loss on assistant turns.

    Assistant turn i spans the characters between the rendering of ``messages[:i]`` with the
    generation prompt and the rendering of ``messages[:i+1]``; tokens starting inside a span keep
    their label (needs a fast tokenizer's offsets; otherwise prefix token counts are used).
    ``max_tokens`` (the training window): turns starting after it are not located (their tokens keep no
    label), so a conversation of thousands of turns costs what its first window does, not the square of its
    length in template renderings.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}:{line_no}: chat 'messages' need a tokenizer with a chat_template, and this "
                        "tokenizer has none; set tokenizer.chat_template or use prompt/response records")
    if not messages:
        raise DataError(f"{path}:{line_no}: 'messages' is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{path}:{line_no}: messages[{i}] should be an object with 'role' and 'content'")

    def render(msgs: list[Any], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - the template is the tokenizer's Jinja code: its errors are the data's
            reason = " ".join(str(exc).split())[:200]
            raise DataError(f"{path}:{line_no}: the tokenizer's chat template rejects these messages "
                            f"({type(exc).__name__}: {reason})") from None

    text = render(messages)
    assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        limit = len(text) if max_tokens is None or len(ids) <= max_tokens else offsets[max_tokens][0]
        spans: list[tuple[int, int]] = []  # increasing, not overlapping
        for i in assistant:
            start = len(render(messages[:i], True)) if i else 0
            if start >= limit:
                break
            spans.append((start, len(render(messages[: i + 1]))))
        starts = [s for s, _ in spans]
        labels = []
        for tok, (a, _) in zip(ids, offsets):
            k = bisect.bisect_right(starts, a) - 1
            labels.append(tok if k >= 0 and a < spans[k][1] else IGNORE_INDEX)
        return ids, labels
    ids = _encode(tokenizer, text, special=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i in assistant:
        a = len(_encode(tokenizer, render(messages[:i], True), special=False)) if i else 0
        if max_tokens is not None and a >= max_tokens:
            break
        b = len(_encode(tokenizer, render(messages[: i + 1]), special=False))
        labels[a:b] = ids[a:b]
    return ids, labels


# ---- sequence classification ----------------------------------------------------------------------

def load_classification_data(path: str | Path, tokenizer: Any, seq_len: int, text_field: str = "text",
                             label_field: str = "label",
                             label_names: list[str] | None = None) -> tuple[TokenDataset, list[str]]:
    """JSONL ``{text, label}`` records → ``(dataset, label_names)`` for encoder classification.

    ``dataset`` has ``input_ids``/``attention_mask`` ``[N, seq_len]`` and ``labels`` ``[N]`` (class ids).
    Integer labels are used as they are (names ``"0".."max"``); string labels are mapped to ids in
    sorted order, or in the order of ``label_names`` when given (pass the train split's names when
    loading its eval split).
    """
    path = Path(path)
    texts, raw = [], []
    for line_no, record in read_jsonl(path):
        texts.append(_field(record, text_field, path, line_no))
        value = _field(record, label_field, path, line_no, (str, int))
        if isinstance(value, bool):
            value = int(value)
        raw.append((line_no, value))
    if not texts:
        raise DataError(f"{path}: no examples (the file holds no records)")
    if all(isinstance(v, int) for _, v in raw):
        ids = [int(v) for _, v in raw]
        if min(ids) < 0:
            raise DataError(f"{path}: integer labels must be ≥ 0, found {min(ids)}")
        limit = len(label_names) if label_names else MAX_CLASSES
        if max(ids) >= limit:
            line_no = next(n for n, v in raw if v == max(ids))
            raise DataError(f"{path}:{line_no}: integer label {max(ids)} is not a class id below {limit} "
                            f"({'the classes given' if label_names else 'use string labels for sparse ids'})")
        names = label_names or [str(i) for i in range(max(ids) + 1)]
    else:
        names = label_names or sorted({str(v) for _, v in raw})
        index = {name: i for i, name in enumerate(names)}
        ids = []
        for line_no, value in raw:
            if str(value) not in index:
                raise DataError(f"{path}:{line_no}: label {value!r} is not one of {names}")
            ids.append(index[str(value)])
    encoded = tokenizer(texts, truncation=True, max_length=seq_len, verbose=False)["input_ids"]
    tensors = _stack([(list(row), list(row)) for row in encoded], seq_len, pad_id(tokenizer)).tensors
    tensors["labels"] = torch.tensor(ids, dtype=torch.long)
    return TokenDataset(tensors, names), names
