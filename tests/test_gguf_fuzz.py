"""Seeded mutational fuzzing of lowbit.io.gguf.reader over small GGUF files written by gguf.GGUFWriter.

Each case takes one of a few seed files (a few KB: metadata of every kind, F32/F16/Q8_0/Q4_0/Q4_K
tensors, a custom alignment, a big-endian file, a metadata-only file) and stacks 1-3 mutations: bit
flips, byte overwrites, boundary integers (0, 0xFF.., 2**31, 2**32, 2**40, 2**63, …) written as
u32/u64 at random (mostly aligned) offsets, truncation, a splice of two seeds, chunk duplication,
deletion and insertion. Offsets lean towards the header/metadata/tensor-info region, where the checks are.

Every case must end in a GGUFFile or a LowbitError — any other exception, a case over 1 s, or over
100 MB of peak traced memory (tracemalloc sees numpy's allocations too) fails the test. A GGUFFile
must hold tensors inside the file and not overlapping; every tensor's bytes are then read through
``tensor_bytes``/``raw_rows`` (reading outside the mapping would crash the process), and the file is
cross-checked against ``gguf.GGUFReader`` (safe to run once our reader has bounded every count).

Environment:
    LOWBIT_FUZZ_CASES   number of cases (default 2000)
    LOWBIT_FUZZ_SEED    master seed (default 0); case ``i`` uses ``random.Random(f"{seed}:{i}")``
    LOWBIT_FUZZ_ONLY    run only this case number (to reproduce a failure printed by the test)

Run with ``-s`` to see the counts: cases, successes, errors by message kind, timings.
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import struct
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFReader, GGUFValueType as V, GGUFWriter
from gguf.quants import quantize

from fuzz_support import REPORTS, FuzzReport  # noqa: E402
from gguf_support import overwrite  # noqa: E402
from lowbit.errors import LowbitError
from lowbit.io.gguf.reader import GGUFFile, read_gguf

N_CASES = int(os.environ.get("LOWBIT_FUZZ_CASES", "2000"))
MASTER_SEED = int(os.environ.get("LOWBIT_FUZZ_SEED", "0"))
ONLY = os.environ.get("LOWBIT_FUZZ_ONLY")
CASE_SECONDS = 1.0
CASE_BYTES = 100 * 2**20
HANG_SECONDS = 10  # a case still running after this is interrupted and reported as a hang



BOUNDARY = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 63, 64, 255, 256, 0x7F, 0x80, 0xFFFF, 0x10000,
            2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _write(path: Path, *, endianess: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = None,
           tensors: bool = True, vocab: int = 24) -> None:
    g = np.random.default_rng(len(path.name))
    w = GGUFWriter(path, "llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("fuzz")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("t.flag", True)
    w.add_key_value("t.i64", -5, V.INT64)
    w.add_key_value("t.u16s", [1, 2, 3], V.ARRAY, sub_type=V.UINT16)
    w.add_key_value("t.f64", 2.5, V.FLOAT64)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" if i % 5 else "▁é" for i in range(vocab)])
    w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(vocab)])
    w.add_key_value("tokenizer.ggml.token_type", [1] * vocab, V.ARRAY, sub_type=V.INT32)
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.bools", [True, False])
    if tensors:
        w.add_tensor("token_embd.weight", g.standard_normal((4, 32)).astype(np.float32))
        w.add_tensor("output_norm.weight", g.standard_normal(32).astype(np.float16))
        w.add_tensor("blk.0.attn_q.weight", quantize(g.standard_normal((2, 64)).astype(np.float32), Q.Q8_0),
                     raw_dtype=Q.Q8_0)
        w.add_tensor("blk.0.ffn_up.weight", quantize(g.standard_normal((3, 32)).astype(np.float32), Q.Q4_0),
                     raw_dtype=Q.Q4_0)
        w.add_tensor("blk.0.ffn_down.weight", g.integers(0, 256, (1, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Seed(NamedTuple):
    """A seed file and its layout, taken from gguf.GGUFReader (a trusted file): where each field lies."""

    blob: bytes
    header_end: int  # the data offset: metadata and tensor info lie before it
    order: str  # "<" or ">"
    fields: list[int]  # start of every length/count/type/value/dim/offset field
    kv_spans: list[tuple[int, int]]  # [start, end) of each metadata record
    ti_spans: list[tuple[int, int]]  # [start, end) of each tensor-info record


def _seed(path: Path) -> Seed:
    r = GGUFReader(path)
    base = r.data.ctypes.data
    records = [f for f in r.fields.values()] + [t.field for t in r.tensors]
    fields = sorted({int(p.ctypes.data - base) for f in records for p in f.parts})
    span = lambda f: (f.offset, f.offset + sum(int(p.nbytes) for p in f.parts))  # noqa: E731
    return Seed(path.read_bytes(), read_gguf(path).data_offset, "<" if r.byte_order == "I" else ">", fields,
                [span(f) for k, f in r.fields.items() if not k.startswith("GGUF.")], [span(t.field) for t in r.tensors])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    d = tmp_path_factory.mktemp("fuzz_seeds")
    _write(d / "model.gguf")
    _write(d / "aligned.gguf", alignment=64, vocab=8)
    _write(d / "big_endian.gguf", endianess=GGUFEndian.BIG, vocab=6)
    _write(d / "meta.gguf", tensors=False, vocab=40)
    return [_seed(d / name) for name in ("model.gguf", "aligned.gguf", "big_endian.gguf", "meta.gguf")]


# ------------------------------------------------------------------------------------------- mutations


def _offset(rng: random.Random, size: int, header_end: int, align: int = 1) -> int:
    """An offset < size, 80% of the time inside the header (metadata + tensor info), aligned to ``align``."""
    hi = min(header_end, size) if rng.random() < 0.8 else size
    off = rng.randrange(max(hi, 1))
    return off - off % align


def _mutate(rng: random.Random, data: bytearray, seed: Seed, other: bytes) -> str:
    kind = rng.choice(["bitflip", "bytes", "int", "int", "field", "field", "field", "record", "truncate", "splice",
                       "dup", "delete", "insert"])
    size, header_end = len(data), seed.header_end
    if size == 0:
        data += bytes(rng.randrange(64))
        return "refill"
    if kind == "bitflip":
        flips = [(_offset(rng, size, header_end), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
        for off, bit in flips:
            data[off] ^= 1 << bit
        return f"bitflip{flips}"
    if kind == "bytes":
        off, n = _offset(rng, size, header_end), rng.randint(1, 8)
        val = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        data[off:off + n] = bytes([val]) * len(data[off:off + n])
        return f"bytes@{off}x{n}={val:#x}"
    if kind in ("int", "field"):  # a boundary value as u32/u64: anywhere (mostly aligned), or at a field's start
        width = rng.choice([4, 8])
        value = rng.choice(BOUNDARY + [size, size - header_end, rng.randrange(2**(width * 8))]) % 2**(width * 8)
        if kind == "field":
            off, order = rng.choice(seed.fields), seed.order
        else:
            off, order = _offset(rng, size, header_end, rng.choice([width, width, 4, 1])), rng.choice("<<<>")
        if off >= size:
            return f"{kind}@{off}(past end)"
        packed = struct.pack(order + ("I" if width == 4 else "Q"), value)
        data[off:off + width] = packed[:len(data[off:off + width])]
        return f"{kind}{width * 8}{order}@{off}={value}"
    if kind == "record":  # repeat a metadata or tensor-info record and count it: duplicate names, same offsets
        spans, count_at = (seed.ti_spans, 8) if seed.ti_spans and rng.random() < 0.5 else (seed.kv_spans, 16)
        a, b = rng.choice(spans)
        if b > size:
            return "record(past end)"
        data[b:b] = data[a:b]
        fmt = seed.order + "Q"
        data[count_at:count_at + 8] = struct.pack(fmt, (struct.unpack_from(fmt, data, count_at)[0] + 1) % 2**64)
        return f"record[{a}:{b}]+1@{count_at}"
    if kind == "truncate":
        n = _offset(rng, size, header_end)
        del data[n:]
        return f"truncate@{n}"
    if kind == "splice":
        a, b = _offset(rng, size, header_end), rng.randrange(len(other))
        data[a:] = other[b:]
        return f"splice@{a}+other[{b}:]"
    a = _offset(rng, size, header_end)
    n = rng.choice([1, 4, 8, 12, 16, rng.randint(1, 256)])
    if kind == "dup":
        chunk = bytes(data[a:a + n])
        at = _offset(rng, size, header_end)
        data[at:at] = chunk
        return f"dup[{a}:{a + n}]@{at}"
    if kind == "delete":
        del data[a:a + n]
        return f"delete[{a}:{a + n}]"
    data[a:a] = bytes(rng.randrange(256) for _ in range(n))
    return f"insert@{a}x{n}"


def make_case(case: int, seeds: list[Seed]) -> tuple[bytes, str]:
    """The bytes of fuzz case ``case`` and a description of its mutations (deterministic in the seed)."""
    rng = random.Random(f"{MASTER_SEED}:{case}")
    which = rng.randrange(len(seeds))
    seed = seeds[which]
    other = seeds[rng.randrange(len(seeds))].blob
    data = bytearray(seed.blob)
    steps = [_mutate(rng, data, seed, other) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    return bytes(data), f"seed{which}: " + "; ".join(steps)


# ------------------------------------------------------------------------------------------- checking


@contextmanager
def _hang_guard(seconds: int) -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise TimeoutError(f"case still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _kind(err: LowbitError, path: Path) -> str:
    """A message without its numbers, names and path: 'metadata '…' at byte N: array of N … elements'."""
    msg = str(err).removeprefix(f"{path}: ")
    msg = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|b'.*?'", "'…'", msg)
    msg = re.sub(r"\[\d+\]", "[N]", msg)
    msg = re.sub(r"\d+", "N", msg)
    msg = re.sub(r"\(.*?\)", "(…)", msg)
    return msg.split(" at byte N: ")[-1][:70]


def _check_success(f: GGUFFile) -> int:
    """Invariants of an accepted file; reads every tensor byte. Returns a checksum (so the reads happen)."""
    total = 0
    spans = []
    for name, info in f.tensors.items():
        assert info.name == name and 1 <= len(info.ne) <= 4 and all(d >= 1 for d in info.ne)
        assert info.offset >= f.data_offset and info.offset % f.alignment == 0
        assert info.offset + info.nbytes <= f.file_size
        data = f.tensor_bytes(name)
        assert data.numel() == info.nbytes
        total += int(data.sum())
        rows = f.raw_rows(name)
        assert rows.shape[0] * rows.shape[1] == info.nbytes
        spans.append((info.offset, info.offset + info.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    return total


def _flatten(value: object) -> object:
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [x for inner in value for x in inner]
    return value


def _agrees_with_gguf_reader(f: GGUFFile) -> str | None:
    """Compare with gguf.GGUFReader (on a file our reader accepted); a description of the first difference."""
    try:
        theirs = GGUFReader(f.path)
    except Exception as exc:  # noqa: BLE001 - any failure of theirs on a file we accept is worth a look
        return f"GGUFReader raised {type(exc).__name__}: {exc}"
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    if keys != list(f.metadata):
        return f"keys differ: {keys} vs {list(f.metadata)}"
    for key in keys:
        value = _flatten(f.metadata[key])
        try:
            other = theirs.fields[key].contents()
        except UnicodeDecodeError as exc:
            return f"GGUFReader cannot decode {key!r}: {exc}"
        if isinstance(value, list) and value and isinstance(value[0], bool):
            other = [bool(x) for x in other]
        if other != value and not (isinstance(value, float) and value != value):
            same_nan = isinstance(value, list) and len(value) == len(other or []) and all(
                a == b or (a != a and b != b) for a, b in zip(value, other))
            if not same_nan:
                return f"metadata {key!r}: {other!r} vs {value!r}"
    if theirs.data_offset != f.data_offset or [t.name for t in theirs.tensors] != list(f.tensors):
        return "data offset or tensor names differ"
    for t in theirs.tensors:
        info = f.tensors[t.name]
        if (t.tensor_type, t.data_offset, t.n_bytes, t.shape.tolist()) != \
                (info.ggml_type, info.offset, info.nbytes, list(info.ne)):
            return f"tensor {t.name!r} differs"
    return None


def test_fuzz_reader(seeds: list[Seed], tmp_path: Path) -> None:
    path = tmp_path / "case.gguf"
    cases = [int(ONLY)] if ONLY is not None else range(N_CASES)
    kinds: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    successes = 0
    max_time = max_peak = 0.0
    start = time.perf_counter()
    tracemalloc.start()
    try:
        for case in cases:
            blob, how = make_case(case, seeds)
            overwrite(path, blob)
            repro = f"LOWBIT_FUZZ_SEED={MASTER_SEED} LOWBIT_FUZZ_ONLY={case} ({how}; {len(blob)} bytes)"
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            f = None
            try:
                with _hang_guard(HANG_SECONDS):
                    f = read_gguf(path)
                    _check_success(f)
            except LowbitError as exc:
                kinds[_kind(exc, path)] += 1
            except Exception as exc:  # noqa: BLE001 - the point of the test
                failures.append(f"{repro}: {type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] - base
            max_time, max_peak = max(max_time, elapsed), max(max_peak, peak)
            if elapsed > CASE_SECONDS:
                failures.append(f"{repro}: took {elapsed:.2f} s")
            if peak > CASE_BYTES:
                failures.append(f"{repro}: peak traced memory {peak / 2**20:.0f} MB")
            if f is not None:
                successes += 1
                diff = _agrees_with_gguf_reader(f)
                if diff is not None:
                    failures.append(f"{repro}: disagrees with gguf.GGUFReader: {diff}")
            del f
    finally:
        tracemalloc.stop()
    total = time.perf_counter() - start

    n = len(cases)
    print(f"\nGGUF fuzz: {n} cases (seed {MASTER_SEED}) in {total:.1f} s; {successes} read, "
          f"{n - successes - len(failures)} rejected with LowbitError, {len(failures)} failures; "
          f"slowest case {max_time * 1e3:.1f} ms, peak traced memory {max_peak / 2**20:.2f} MB")
    for kind, count in kinds.most_common():
        print(f"  {count:6d}  {kind}")
    REPORTS.append(FuzzReport("gguf_reader", cases=n, ok=successes, errors=kinds, failures=failures, seconds=total,
                              slowest=max_time, peak_bytes=int(max_peak), memory_kind="tracemalloc peak"))
    assert not failures, f"{len(failures)} failing cases, e.g.:\n" + "\n".join(failures[:20])
    if ONLY is None and N_CASES >= 500:  # the mutations must reach both outcomes and many distinct checks
        assert successes > n // 20 and sum(kinds.values()) > n // 4 and len(kinds) >= 15, kinds
