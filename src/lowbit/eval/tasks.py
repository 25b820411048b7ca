"""Multiple-choice tasks from local JSONL, scored by log-likelihood as lm-evaluation-harness does.

One item per line::

    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0, "task": "geo"}

(``query``/``question`` are accepted for ``context``, ``gold``/``label`` for ``answer``; ``task`` is
optional and other fields are ignored). Each choice is the continuation ``delimiter + choice`` of the
context; its score is the summed log-probability of the continuation's tokens given the context,
with the pair tokenized as lm-eval's ``_encode_pair`` does (context and context+continuation
tokenized whole, the continuation being the tokens past the context's; trailing whitespace of the
context moves into the continuation; no special tokens; an empty context becomes the BOS token).

``acc`` counts items whose highest-scoring choice is the answer; ``acc_norm`` divides each score by
the choice's length in UTF-8 bytes first (lm-eval's ``acc_norm``). Standard errors are lm-eval's
``mean_stderr``: ``sqrt(p(1 − p) / (n − 1))``.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lowbit.errors import CorruptFileError, InvalidSpecError, ModelNotFoundError
from lowbit.progress import progress

CONTEXT_KEYS = ("context", "query", "question")
ANSWER_KEYS = ("answer", "gold", "label")
DEFAULT_TASK = "default"
DEFAULT_MAX_LENGTH = 2048  # when the model's config names no max_position_embeddings


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: ``choices[answer]`` is the right continuation of ``context``."""

    context: str
    choices: tuple[str, ...]
    answer: int
    task: str = DEFAULT_TASK


@dataclass
class TaskScore:
    """Accuracy over ``n`` items (fractions in [0, 1]); ``chance`` is the mean of 1 / number of choices."""

    n: int
    acc: float
    acc_stderr: float | None
    acc_norm: float
    acc_norm_stderr: float | None
    chance: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TasksResult:
    """``overall`` over every item, ``tasks`` per ``task`` name, ``logliks[i][j]`` item i's choice j."""

    overall: TaskScore
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    logliks: list[list[float]] = field(default_factory=list)


# ---- reading -----------------------------------------------------------------------------
def read_tasks(path: str | Path) -> list[ChoiceItem]:
    """The items of a JSONL task file (blank lines skipped); a malformed line raises naming its number."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: task file not found")
    from lowbit.io.jsonl import iter_jsonl

    items = [parse_record(record, f"{path}:{number}") for number, record in iter_jsonl(path, CorruptFileError)]
    if not items:
        raise InvalidSpecError(f"{path}: no task items (expected one JSON object per line)")
    return items


def parse_record(record: dict[str, Any], where: str) -> ChoiceItem:
    """One JSONL record → :class:`ChoiceItem`; ``where`` (``file:line``) names it in errors."""
    context = _one_of(record, CONTEXT_KEYS, where)
    answer = _one_of(record, ANSWER_KEYS, where)
    choices = record.get("choices")
    task = record.get("task", DEFAULT_TASK)
    if not isinstance(context, str):
        raise CorruptFileError(f"{where}: the context must be a string, got {type(context).__name__}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise CorruptFileError(f"{where}: 'choices' must be a list of at least 2 non-empty strings"
                               + ("" if "choices" in record else f" (fields: {', '.join(sorted(record))})"))
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise CorruptFileError(f"{where}: the answer must be an integer index into the {len(choices)} choices, "
                               f"got {answer!r}")
    if not isinstance(task, str) or not task:
        raise CorruptFileError(f"{where}: 'task' must be a non-empty string, got {task!r}")
    return ChoiceItem(context, tuple(choices), answer, task)


def _one_of(record: dict[str, Any], keys: Sequence[str], where: str) -> Any:
    present = [k for k in keys if k in record]
    if len(present) != 1:
        problem = "no" if not present else "more than one"
        raise CorruptFileError(f"{where}: {problem} field of {' / '.join(keys)} "
                               f"(fields: {', '.join(sorted(record)) or 'none'})")
    return record[present[0]]


# ---- scoring -----------------------------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's ``_encode_pair``: the continuation's ids are those of
    ``context + continuation`` past the context's own (so a merge across the boundary stays intact)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise InvalidSpecError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
        return [prefix], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    n_context = len(_encode(tokenizer, context))
    return whole[:n_context], whole[n_context:]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"])


@torch.no_grad()
def score_choices(model: nn.Module, tokenizer: Any, items: Sequence[ChoiceItem], *, batch_size: int = 8,
                  max_length: int | None = None, delimiter: str = " ", show_progress: bool = False
                  ) -> list[list[float]]:
    """Summed log-probability (nats) of each item's each ``delimiter + choice`` given its context.

    Every (item, choice) pair is one sequence of at most ``max_length`` tokens (left-truncated as lm-eval
    does; default: the model's ``max_position_embeddings``); sequences go through the model
    ``batch_size`` at a time, longest first, right-padded — exact for a causal model, since no real
    position attends to the padding after it.

    Returns:
        ``logliks[i][j]`` for item i, choice j.
    """
    if batch_size < 1:
        raise InvalidSpecError(f"batch_size must be ≥ 1, got {batch_size}")
    max_length = max_length or int(getattr(getattr(model, "config", None), "max_position_embeddings", 0)
                                   or DEFAULT_MAX_LENGTH)
    requests = []  # (item, choice, input ids, continuation length)
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, item.context, delimiter + choice)
            if not continuation_ids:
                raise InvalidSpecError(f"item {i} choice {j} ({choice!r}) has no tokens of its own")
            seq = (context_ids + continuation_ids)[-(max_length + 1):][:-1]  # inputs; targets are shifted by 1
            requests.append((i, j, seq, continuation_ids))
    requests.sort(key=lambda r: -len(r[2]))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    logliks = [[0.0] * len(item.choices) for item in items]
    batches = [requests[k : k + batch_size] for k in range(0, len(requests), batch_size)]
    for batch in progress(batches, desc="tasks", enabled=show_progress, unit="batch"):
        width = len(batch[0][2])
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, _, seq, _) in enumerate(batch):
            inputs[row, : len(seq)] = torch.tensor(seq)
        logits = model(input_ids=inputs.to(device)).logits  # [B, W, V] (+ virtual positions: prompt tuning)
        logits = logits[:, logits.shape[1] - width:]
        for row, (i, j, seq, continuation) in enumerate(batch):
            n = len(continuation)
            logp = torch.log_softmax(logits[row, len(seq) - n : len(seq)].float(), dim=-1)  # [n, V]
            target = torch.tensor(continuation, device=logp.device).unsqueeze(-1)
            logliks[i][j] = logp.gather(-1, target).sum().item()
    return logliks


def evaluate_tasks(model: nn.Module, tokenizer: Any, items: Sequence[ChoiceItem], *, batch_size: int = 8,
                   max_length: int | None = None, delimiter: str = " ", show_progress: bool = False) -> TasksResult:
    """``acc``/``acc_norm`` (with standard errors) of ``model`` on ``items``, overall and per task."""
    if not items:
        raise InvalidSpecError("no task items to evaluate")
    logliks = score_choices(model, tokenizer, items, batch_size=batch_size, max_length=max_length,
                            delimiter=delimiter, show_progress=show_progress)
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    tasks = {name: _score([items[i] for i in idx], [logliks[i] for i in idx]) for name, idx in by_task.items()}
    return TasksResult(_score(items, logliks), tasks, logliks)


def _score(items: Sequence[ChoiceItem], logliks: Sequence[Sequence[float]]) -> TaskScore:
    acc = [float(_argmax(ll) == item.answer) for item, ll in zip(items, logliks)]
    acc_norm = [float(_argmax([v / len(c.encode("utf-8")) for v, c in zip(ll, item.choices)]) == item.answer)
                for item, ll in zip(items, logliks)]
    chance = sum(1.0 / len(item.choices) for item in items) / len(items)
    return TaskScore(len(items), _mean(acc), _stderr(acc), _mean(acc_norm), _stderr(acc_norm), chance)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))  # first of ties, as numpy.argmax


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n) (None for a single item)."""
    n = len(values)
    if n < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# ---- the built-in task file ----------------------------------------------------------------
WORD_RE = re.compile(r"[A-Za-z]{3,}")
PHRASE_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*[,.;:]?")


def build_cloze_tasks(text: str, *, words: int = 50, phrases: int = 50, distractors: int = 3, seed: int = 0,
                      max_context_words: int = 60) -> list[dict[str, Any]]:
    """Cloze items (the JSONL records of ``lowbit/data/tiny-lm/tasks.jsonl``) cut from prose paragraphs of ``text``.

    ``next-word``: context = a paragraph up to a word, choices = that word and ``distractors`` words drawn
    from the text's word occurrences (so they are as frequent as real next words; case matched).
    ``next-phrase``: the next three words against three-word spans from other paragraphs. Deterministic
    in ``seed``; each paragraph gives at most one item.
    """
    rng = random.Random(seed)
    paragraphs = _prose_paragraphs(text)
    pool = [m.group() for p in paragraphs for m in re.finditer(r"\S+", p) if WORD_RE.fullmatch(m.group())]
    order = rng.sample(range(len(paragraphs)), len(paragraphs))
    records: list[dict[str, Any]] = []
    counts = Counter[str]()
    for index in order:
        kind = "next-word" if counts["next-word"] < words else "next-phrase"
        if counts[kind] >= (words if kind == "next-word" else phrases):
            break
        record = _cloze_item(paragraphs, index, kind, pool, rng, distractors, max_context_words)
        if record is not None:
            records.append(record)
            counts[kind] += 1
    return records


def _prose_paragraphs(text: str) -> list[str]:
    """Blocks of running English text (no code, prompts or signatures) of at least 20 words."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").splitlines()
        tokens = block.split()
        if len(tokens) < 20 or any(line.lstrip().startswith((">>>", "$", "...")) for line in lines):
            continue
        if sum(bool(PHRASE_WORD_RE.fullmatch(t)) for t in tokens) >= 0.85 * len(tokens):
            out.append(block.strip("\n"))
    return out


def _cloze_item(paragraphs: list[str], index: int, kind: str, pool: list[str], rng: random.Random,
                distractors: int, max_context_words: int) -> dict[str, Any] | None:
    paragraph = paragraphs[index]
    spans = [m for m in re.finditer(r"\S+", paragraph)]
    span_len = 1 if kind == "next-word" else 3
    # a cut after at least 8 words, at a word preceded by exactly one space, with clean words after it
    cuts = [k for k in range(8, len(spans) - span_len + 1)
            if paragraph[spans[k].start() - 1] == " " and paragraph[spans[k].start() - 2] != " "
            and all((WORD_RE if kind == "next-word" else PHRASE_WORD_RE).fullmatch(spans[k + d].group())
                    for d in range(span_len))
            and " ".join(s.group() for s in spans[k : k + span_len]) == paragraph[spans[k].start():
                                                                                   spans[k + span_len - 1].end()]]
    if not cuts:
        return None
    k = rng.choice(cuts)
    context = paragraph[spans[max(0, k - max_context_words)].start() : spans[k].start() - 1]
    answer = paragraph[spans[k].start() : spans[k + span_len - 1].end()]
    if kind == "next-word":
        wrong = _distinct(lambda: _match_case(rng.choice(pool), answer), answer, distractors)
    else:
        wrong = _distinct(lambda: _random_phrase(paragraphs, index, answer, rng), answer, distractors)
    if wrong is None:
        return None
    choices = wrong + [answer]
    rng.shuffle(choices)
    return {"task": kind, "context": context, "choices": choices, "answer": choices.index(answer)}


def _distinct(draw: Any, answer: str, n: int, tries: int = 200) -> list[str] | None:
    seen = {answer.lower()}
    out: list[str] = []
    for _ in range(tries):
        if len(out) == n:
            return out
        candidate = draw()
        if candidate is not None and candidate.lower() not in seen:
            seen.add(candidate.lower())
            out.append(candidate)
    return out if len(out) == n else None


def _match_case(word: str, like: str) -> str:
    if like.islower():
        return word.lower()
    if like[:1].isupper() and like[1:].islower():
        return word.capitalize()
    return word


def _random_phrase(paragraphs: list[str], not_index: int, like: str, rng: random.Random) -> str | None:
    """Three words from another paragraph, starting with a capital exactly when ``like`` does."""
    index = rng.randrange(len(paragraphs))
    if index == not_index:
        return None
    words = paragraphs[index].split()
    k = rng.randrange(len(words) - 2)
    phrase = words[k : k + 3]
    if phrase[0][0].isupper() != like[0].isupper() or not all(PHRASE_WORD_RE.fullmatch(w) for w in phrase):
        return None
    return " ".join(phrase)
