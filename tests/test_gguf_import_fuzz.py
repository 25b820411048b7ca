"""Fuzzing ``lowbit import`` end to end: mutated GGUF model files → a model directory or a typed lowbit error.

The reader's own fuzz (test_gguf_fuzz.py) covers the container; this one covers what import does with
what the container holds: hyper-parameters of the wrong type or range, inconsistent tokenizer arrays,
a stored Hugging Face config that lies, tensor shapes that disagree with the metadata, NaN weights.
Two mutators, over a tiny real model file made by ``lowbit export``:

* structured: the file is re-written with one metadata value replaced (another type, a boundary
  number, a huge string, an array cut short or with a foreign element) or deleted;
* bytes: bit flips, boundary integers and truncation anywhere in the file.

Each case must end in success or a :class:`LowbitError`, in < 1 s and < 100 MB of Python allocations
(tracemalloc); on success the output loads. ``LOWBIT_FUZZ_CASES`` (default 100 per mutator) raises the
count; ``LOWBIT_FUZZ_SEED`` changes the seed.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import struct
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lowbit.errors import LowbitError

CASES = int(os.environ.get("LOWBIT_FUZZ_CASES", "100"))
SEED = int(os.environ.get("LOWBIT_FUZZ_SEED", "0"))
BOUNDARY = [0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**40, 2**63 - 1, -(2**63), 1.5, -0.0, 1e300,
            math.nan, math.inf, -math.inf, True, False, "", "x" * 5000, "llama", "qwen3", [], [1, 2], ["a", "b"],
            [[1]], [math.nan]]


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 64, 2 layers) with a 320-token BPE tokenizer, exported as Q8_0 with lowbit's hf_config."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lowbit.io.gguf.writer import export_gguf
    from lowbit.models.resolve import builtin_dir

    root = tmp_path_factory.mktemp("fuzz-import")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (builtin_dir("tiny-lm") / "eval.txt").read_text(encoding="utf-8")[:20000]
    tok.train_from_iterator([text], trainer)
    src = root / "src"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(src)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(src)
    out = root / "seed.gguf"
    export_gguf(src, out, type="q8_0", show_progress=False)
    return out


def _run_case(path: Path, out: Path) -> str:
    """'ok' or the LowbitError's first words; anything else propagates (a test failure)."""
    from lowbit.io.gguf.importer import import_gguf

    shutil.rmtree(out, ignore_errors=True)
    try:
        import_gguf(path, out, show_progress=False)
    except LowbitError as exc:
        assert not out.exists(), "a failed import left its output behind"
        return f"{type(exc).__name__}: " + " ".join(str(exc).split(": ")[1:2])[:48]
    import lowbit

    lowbit.load(out)
    return "ok"


def _check(results: Counter, label: str, path: Path, out: Path) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        kind = _run_case(path, out)
    except Exception as exc:  # noqa: BLE001 - the point: nothing but LowbitError may escape
        raise AssertionError(f"{label}: {type(exc).__name__}: {exc}") from exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0 or kind == "ok" and elapsed < 5.0, f"{label}: took {elapsed:.2f} s ({kind})"
    assert peak < 100 << 20, f"{label}: {peak / 2**20:.0f} MB"
    results[kind.split(":")[0] if kind != "ok" else "ok"] += 1


def _rewrite(seed: Path, dest: Path, mutate) -> None:
    """Re-write ``seed`` with GGUFWriter after ``mutate(metadata)`` (tensors copied byte for byte)."""
    import gguf

    from lowbit.io.gguf.reader import read_gguf

    g = read_gguf(seed)
    meta = dict(g.metadata)
    mutate(meta)
    w = gguf.GGUFWriter(str(dest), arch=str(meta.get("general.architecture", "llama")) or "llama")
    w.kv_data[0].clear()  # the writer pre-adds general.architecture: write exactly the mutated metadata
    for key, value in meta.items():
        _add(w, key, value)
    for name, info in g.tensors.items():
        data = g.raw_rows(name).numpy() if len(info.shape) == 2 else g.tensor_bytes(name).numpy()
        w.add_tensor(name, data, raw_shape=None, raw_dtype=gguf.GGMLQuantizationType(int(info.ggml_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add(w: Any, key: str, value: Any) -> None:
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_key_value(key, value, T.BOOL)
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            w.add_key_value(key, value, T.INT64)
        else:
            w.add_key_value(key, value, T.UINT64)
    elif isinstance(value, float):
        w.add_key_value(key, value, T.FLOAT64)
    elif isinstance(value, str):
        w.add_key_value(key, value, T.STRING)
    elif isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            w.add_key_value(key, value, T.ARRAY, T.STRING)
        elif value and all(isinstance(v, list) for v in value):
            w.add_key_value(key, value, T.ARRAY, T.ARRAY)
        elif value and all(isinstance(v, float) for v in value):
            w.add_key_value(key, value, T.ARRAY, T.FLOAT32)
        else:
            w.add_key_value(key, [int(v) if isinstance(v, (int, bool)) else 0 for v in value] or [], T.ARRAY, T.INT32)


def _mutation(rng: random.Random, keys: list[str]):
    key = rng.choice(keys)
    op = rng.random()

    def mutate(meta: dict[str, Any]) -> None:
        if op < 0.15:
            meta.pop(key, None)
        elif op < 0.7 or not isinstance(meta.get(key), list):
            meta[key] = rng.choice(BOUNDARY)
        else:
            arr = list(meta[key])
            if rng.random() < 0.5 and arr:
                del arr[rng.randrange(len(arr)):]
            elif arr:
                arr[rng.randrange(len(arr))] = rng.choice([v for v in BOUNDARY if not isinstance(v, list)])
            meta[key] = arr
    return f"{'delete' if op < 0.15 else 'set'} {key}", mutate


def _record(name: str, results: Counter, start: float) -> None:
    """Add this run to the table ``make fuzz`` ends with (failures stop the test before this)."""
    from fuzz_support import REPORTS, FuzzReport

    errors = Counter({k: v for k, v in results.items() if k != "ok"})
    REPORTS.append(FuzzReport(name, sum(results.values()), results["ok"], errors, seconds=time.perf_counter() - start,
                              memory_kind="tracemalloc peak"))


def test_structured_metadata_mutations(seed_file: Path, tmp_path: Path, capsys) -> None:
    from lowbit.io.gguf.reader import read_gguf

    rng = random.Random(SEED)
    keys = list(read_gguf(seed_file).metadata)
    start = time.perf_counter()
    results: Counter = Counter()
    case = tmp_path / "case.gguf"
    for i in range(CASES):
        label, mutate = _mutation(rng, keys)
        try:
            _rewrite(seed_file, case, mutate)
        except (ValueError, TypeError, OverflowError, KeyError, struct.error):
            continue  # the gguf writer itself refused this value; nothing to import
        _check(results, f"case {i} (seed {SEED}): {label}", case, tmp_path / "out")
    _record("gguf_import_structured", results, start)
    with capsys.disabled():
        print(f"\nimport fuzz, structured: {sum(results.values())} cases: {dict(results)}")
    assert results["ok"] > 0 and sum(results.values()) >= CASES // 2


def test_byte_mutations(seed_file: Path, tmp_path: Path, capsys) -> None:
    rng = random.Random(SEED + 1)
    data = seed_file.read_bytes()
    start = time.perf_counter()
    results: Counter = Counter()
    case = tmp_path / "case.gguf"
    for i in range(CASES):
        buf = bytearray(data)
        op = rng.random()
        if op < 0.4:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
        elif op < 0.8:
            pos = rng.randrange(0, min(len(buf) - 8, 64 * 1024))  # the header and metadata region
            buf[pos:pos + 8] = rng.choice([0, 2**31, 2**32, 2**40, 2**63, 2**64 - 1]).to_bytes(8, "little")
        else:
            del buf[rng.randrange(len(buf)):]
        case.write_bytes(bytes(buf))
        _check(results, f"case {i} (seed {SEED}): op {op:.2f}", case, tmp_path / "out")
    _record("gguf_import_bytes", results, start)
    with capsys.disabled():
        print(f"\nimport fuzz, bytes: {CASES} cases: {dict(results)}")


def test_nan_weights_are_refused(seed_file: Path, tmp_path: Path) -> None:
    """A tensor whose data decode to NaN is named; no output is left."""
    from lowbit.io.gguf.importer import import_gguf
    from lowbit.io.gguf.reader import read_gguf

    g = read_gguf(seed_file)
    info = g.tensors["blk.1.ffn_up.weight"]
    buf = bytearray(seed_file.read_bytes())
    buf[info.offset:info.offset + 2] = b"\x00\x7e"  # the first Q8_0 block's fp16 scale := NaN
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(buf))
    with pytest.raises(LowbitError, match="blk.1.ffn_up.weight"):
        import_gguf(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
