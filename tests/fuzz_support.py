"""Seeded mutational fuzzing of lowbit's file readers: mutators for bytes and JSON/YAML documents, and the case loop.

A fuzz test gives :func:`run_cases` a reader (``reader(path)`` reads one case) and a case maker
(``make_case(rng, path) -> description`` writes one mutated copy of a real seed file or directory at
``path``). Every case must end in success or a :class:`lowbit.errors.LowbitError` within
``CASE_SECONDS`` (the lesser of wall-clock and CPU time: see ``_Clock``) and ``CASE_BYTES`` of extra memory;
anything else (another exception type, a case over the time or memory bound, a hang) is a failure, reported
with the line that reproduces it.

Memory is the case's peak resident set size over the resident size at its start: Linux resets the
peak counter (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``, so every case gets its own
peak and torch's allocations (invisible to tracemalloc) count too. Where that is unavailable, or with
``LOWBIT_FUZZ_TRACEMALLOC=1``, the tracemalloc peak is used instead (it sees Python and numpy memory
only, and slows allocation-heavy readers ~4×).

Environment:
    LOWBIT_FUZZ_CASES         cases per reader (each test has its own default)
    LOWBIT_FUZZ_SEED          master seed (default 0); case ``i`` of reader ``r`` uses ``Random(f"{r}:{seed}:{i}")``
    LOWBIT_FUZZ_ONLY          run only this case number (to reproduce a failure the test printed)
    LOWBIT_FUZZ_TRACEMALLOC   1: bound tracemalloc's peak instead of the resident set size
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

MASTER_SEED = int(os.environ.get("LOWBIT_FUZZ_SEED", "0"))
ONLY = os.environ.get("LOWBIT_FUZZ_ONLY")
USE_TRACEMALLOC = os.environ.get("LOWBIT_FUZZ_TRACEMALLOC") == "1"
CASE_SECONDS = 1.0
CASE_BYTES = 100 << 20
HANG_SECONDS = 10  # a case still running after this is interrupted (and reported as too slow)

try:  # transformers warns about every odd config value a mutation makes: thousands of lines in `make fuzz -s`
    from transformers.utils import logging as _hf_logging

    _hf_logging.set_verbosity_error()
except ImportError:
    pass

REPORTS: list[FuzzReport] = []  # every report of this session, for the summary table (tests/conftest.py)


def n_cases(default: int) -> int:
    """Cases per reader: ``LOWBIT_FUZZ_CASES`` or the test's default."""
    return int(os.environ.get("LOWBIT_FUZZ_CASES", str(default)))


# ------------------------------------------------------------------------------------------- byte mutations

BOUNDARY_INTS = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _offset(rng: random.Random, size: int, hot: int | None, align: int = 1) -> int:
    """An offset < size; 70% of the time below ``hot`` (a header region) when one is given."""
    hi = min(hot, size) if hot and rng.random() < 0.7 else size
    off = rng.randrange(max(hi, 1))
    return off - off % align


def mutate_bytes(rng: random.Random, data: bytes, others: Sequence[bytes] = (), hot: int | None = None,
                 steps: int | None = None) -> tuple[bytes, str]:
    """``data`` after 1-3 byte-level mutations: bit flips, byte runs, boundary integers (u8/u16/u32/u64, either
    byte order, mostly aligned), truncation, a splice with another seed, duplication, deletion, insertion."""
    buf = bytearray(data)
    done = [_mutate_bytes_once(rng, buf, others, hot) for _ in range(steps or rng.choice([1, 1, 1, 2, 3]))]
    return bytes(buf), "; ".join(done)


def _mutate_bytes_once(rng: random.Random, buf: bytearray, others: Sequence[bytes], hot: int | None) -> str:
    size = len(buf)
    if size == 0:
        buf += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        return "refill"
    kind = rng.choice(["flip", "flip", "run", "int", "int", "int", "truncate", "splice", "dup", "delete", "insert"])
    if kind == "flip":
        spots = [(_offset(rng, size, hot), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
        for off, bit in spots:
            buf[off] ^= 1 << bit
        return f"flip{spots}"
    if kind == "run":
        off, n = _offset(rng, size, hot), rng.randint(1, 16)
        value = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x20, 0x22, 0x5B, 0x7B, rng.randrange(256)])
        buf[off:off + n] = bytes([value]) * len(buf[off:off + n])
        return f"run@{off}x{n}={value:#x}"
    if kind == "int":
        width = rng.choice([1, 2, 4, 8, 8])
        value = rng.choice(BOUNDARY_INTS + [size, rng.randrange(2 ** (8 * width))]) % 2 ** (8 * width)
        if rng.random() < 0.2:
            value = (-value) % 2 ** (8 * width)
        order = rng.choice("<<<>")
        off = _offset(rng, size, hot, rng.choice([width, width, 1]))
        packed = struct.pack(order + {1: "B", 2: "H", 4: "I", 8: "Q"}[width], value)
        buf[off:off + width] = packed[:len(buf[off:off + width])]
        return f"u{8 * width}{order}@{off}={value}"
    if kind == "truncate":
        n = _offset(rng, size, hot)
        del buf[n:]
        return f"truncate@{n}"
    if kind == "splice":
        other = rng.choice(list(others) or [bytes(buf)])
        a, b = _offset(rng, size, hot), rng.randrange(max(len(other), 1))
        buf[a:] = other[b:]
        return f"splice@{a}+other[{b}:]"
    a = _offset(rng, size, hot)
    n = rng.choice([1, 4, 8, 16, rng.randint(1, 256)])
    if kind == "dup":
        at = _offset(rng, size, hot)
        buf[at:at] = bytes(buf[a:a + n])
        return f"dup[{a}:{a + n}]@{at}"
    if kind == "delete":
        del buf[a:a + n]
        return f"delete[{a}:{a + n}]"
    buf[a:a] = bytes(rng.randrange(256) for _ in range(n))
    return f"insert@{a}x{n}"


# ------------------------------------------------------------------------------------------- document mutations


class Dup(list):
    """A JSON object written as its (key, value) pairs in order, so a key may appear twice."""


class Raw(str):
    """Text written into the document as it is (deep nesting, a huge number literal, an invalid token)."""


def boundary_values(rng: random.Random) -> list[Any]:
    """Values of every JSON type at their edges: what a mutated field is replaced with.

    Strings stay ≤ 100 KB: readers that tokenize text spend time and memory in proportion to it, legitimately.
    """
    return [None, True, False, 0, 1, -1, 2, 3, 7, 8, 16, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
            -(2**63), 10**30, -(10**30), 0.0, -0.0, 0.5, 1.5, -1.5, 1e-300, 1e300, math.nan, math.inf, -math.inf,
            "", " ", "x", "default", "int", "nf4", "fp16", "none", "all", "auto", "gptq", "lowbit", "llama",
            "float16", "int32", "I32", "F32", "-1", "0", "1e9", "../../etc/passwd", "\u0000", "é\u2028",
            "a" * rng.choice([100, 5000, 100_000]), [], [None], [0], [1, 2], ["a"], [[1]], [{}], {}, {"": 0},
            {"a": 1}, {"x": [1, {"y": None}]}]


def raw_values(rng: random.Random) -> list[Raw]:
    """Literals json.dumps never writes: deep nesting, numbers past every range, a non-JSON token."""
    depth = rng.choice([64, 1000, 20_000, 100_000])
    return [Raw("[" * depth + "]" * depth), Raw('{"a":' * depth + "1" + "}" * depth),
            Raw("9" * rng.choice([400, 4301, 100_000])), Raw("-" + "9" * 5000), Raw("1e999"), Raw("-1e999"),
            Raw("1" + "0" * 330 + ".5"), Raw("NaN"), Raw("Infinity"), Raw("undefined"), Raw('"\\ud800"'),
            Raw('"\\u0000"')]


def dumps(node: Any) -> str:
    """JSON text of ``node`` (with :class:`Dup` objects and :class:`Raw` literals); NaN/Infinity as Python writes."""
    if isinstance(node, Raw):
        return str(node)
    if isinstance(node, Dup):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in node) + "}"
    if isinstance(node, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in node.items()) + "}"
    if isinstance(node, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in node) + "]"
    return json.dumps(node)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (a tuple of keys/indices) inside ``node``, the root excluded."""
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _set(root: Any, path: tuple, value: Any) -> None:
    _get(root, path[:-1])[path[-1]] = value


def _near(rng: random.Random, value: Any) -> Any:
    """A value of the same type close to an edge: an int ±1, ×2^k, negated; a string cut or doubled."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, value * 2, value << 20, value << 40, 0, value // 2])
    if isinstance(value, float):
        return rng.choice([-value, value * 1e30, value / 1e30, 0.0, math.nan, math.inf])
    if isinstance(value, str):
        return rng.choice([value[: len(value) // 2], value * 2, value.upper(), value + ".", "." + value, value[::-1]])
    if isinstance(value, list):
        return rng.choice([value[:-1], value + copy.deepcopy(value[-1:]), value[::-1], [value]])
    return value


def mutate_doc(rng: random.Random, doc: Any, keys: Sequence[str] = (), steps: int | None = None) -> tuple[Any, str]:
    """A mutated deep copy of a JSON/YAML document (it may hold :class:`Dup` and :class:`Raw` nodes) and what changed.

    Mutations: a value replaced by a boundary value of any type or by a near value of its own type, a key
    deleted, an unknown key added, a key duplicated with another value, a value wrapped in deep nesting or
    replaced by a huge literal, two values swapped, a list emptied or repeated. ``keys`` adds field names
    worth trying (those the reader looks for).
    """
    doc = json.loads(json.dumps(doc))  # a deep copy made of dicts and lists only
    done = []
    for _ in range(steps or rng.choice([1, 1, 1, 2, 3])):
        paths = list(_paths(doc))
        kind = rng.choice(["value", "value", "value", "near", "near", "delete", "add", "dup", "raw", "swap", "list"])
        if not paths or not isinstance(doc, (dict, list)):
            doc = rng.choice(boundary_values(rng) + list(raw_values(rng)))
            done.append(f"root={_show(doc)}")
            continue
        path = rng.choice(paths)
        parent = _get(doc, path[:-1])
        if kind == "value":
            value = rng.choice(boundary_values(rng))
            _set(doc, path, value)
            done.append(f"{_path(path)}={_show(value)}")
        elif kind == "near":
            value = _near(rng, _get(doc, path))
            _set(doc, path, value)
            done.append(f"{_path(path)}~{_show(value)}")
        elif kind == "delete":
            del parent[path[-1]]
            done.append(f"del {_path(path)}")
        elif kind == "add":
            dicts = [p for p in [()] + paths if isinstance(_get(doc, p), dict)]
            where = rng.choice(dicts) if dicts else ()
            target = _get(doc, where)
            if isinstance(target, dict):
                key = rng.choice(list(keys) + ["unknown", "", "__metadata__", "format_version", "0"])
                target[key] = rng.choice(boundary_values(rng))
                done.append(f"add {_path(where + (key,))}")
        elif kind == "dup":
            dicts = [p for p in [()] + paths if isinstance(_get(doc, p), dict) and _get(doc, p)]
            if dicts:
                where = rng.choice(dicts)
                target = _get(doc, where)
                pairs = list(target.items())
                key = rng.choice(pairs)[0]
                extra = (key, rng.choice(boundary_values(rng) + [copy.deepcopy(pairs[0][1])]))
                pairs.insert(rng.randrange(len(pairs) + 1), extra)
                if where:
                    _set(doc, where, Dup(pairs))
                else:
                    doc = Dup(pairs)
                done.append(f"dup {_path(where + (key,))}")
        elif kind == "raw":
            value = rng.choice(raw_values(rng))
            _set(doc, path, value)
            done.append(f"{_path(path)}=raw[{_show(value)}]")
        elif kind == "swap":
            other = rng.choice(paths)
            a, b = _get(doc, path), _get(doc, other)
            if not (other[:len(path)] == path or path[:len(other)] == other):
                _set(doc, path, b)
                _set(doc, other, a)
                done.append(f"swap {_path(path)} {_path(other)}")
        else:  # list
            lists = [p for p in paths if isinstance(_get(doc, p), list)]
            if lists:
                where = rng.choice(lists)
                value = _get(doc, where)
                repeated = [copy.deepcopy(v) for v in value * rng.choice([2, 50])]  # no shared node: no cycle later
                new = rng.choice([[], repeated, value[:1], value[1:], list(reversed(value))])
                _set(doc, where, new)
                done.append(f"list {_path(where)} len {len(value)}→{len(new)}")
        if has_raw(doc):
            break  # Raw/Dup nodes are final: later steps could not walk into them
    return doc, "; ".join(done) or "no-op"


def _path(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}…({len(text)} chars)"


def has_raw(node: Any) -> bool:
    """Whether ``node`` holds a :class:`Dup` or :class:`Raw` (then only :func:`dumps` can write it)."""
    if isinstance(node, (Raw, Dup)):
        return True
    if isinstance(node, dict):
        return any(has_raw(v) for v in node.values())
    if isinstance(node, list):
        return any(has_raw(v) for v in node)
    return False


def mutate_json_text(rng: random.Random, doc: Any, keys: Sequence[str] = ()) -> tuple[bytes, str]:
    """JSON text for a mutated ``doc``: 85% structural (:func:`mutate_doc`), 15% byte mutations of the text."""
    if rng.random() < 0.15:
        text = json.dumps(doc, indent=rng.choice([None, 2])).encode()
        return mutate_bytes(rng, text)
    mutated, how = mutate_doc(rng, doc, keys)
    return dumps(mutated).encode("utf-8", "surrogatepass"), how


YAML_SNIPPETS = [
    "&a [1, 2]", "*undefined_alias", "!!python/object:os.system {}", "!!python/name:os.system", "!!binary aGVsbG8=",
    "!!set {a, b}", "!!timestamp 2001-12-14", "!!float .nan", "!!int 0x7fffffffffffffffff", "!!str", "? [a]\n: b",
    "{a: 1, a: 2}", "[[[[[[[[[[]]]]]]]]]]", "'unterminated", "|\n  block", ">-\n  folded", "~", "0o777", "1_000",
    "0x10", "+.inf", "-.inf", ".NaN", "yes", "off", "\t", "%YAML 1.1", "--- \n...", "@", "`",
]


def yaml_bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" document: ``width ** levels`` references through nested aliases."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def mutate_yaml_text(rng: random.Random, doc: Any, text: str, keys: Sequence[str] = ()) -> tuple[bytes, str]:
    """YAML text for a mutated ``doc`` (or ``text`` mutated as bytes / with YAML constructs spliced in)."""
    import yaml

    r = rng.random()
    if r < 0.12:
        return mutate_bytes(rng, text.encode())
    if r < 0.25:  # a YAML construct replaces one line's value, or is appended as a key
        lines = text.splitlines()
        snippet = rng.choice(YAML_SNIPPETS)
        i = rng.randrange(len(lines) + 1)
        if i < len(lines) and ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}: {snippet}"
        else:
            lines.insert(i, f"{rng.choice(list(keys) or ['k'])}: {snippet}")
        return "\n".join(lines).encode(), f"yaml line {i}: {snippet!r}"
    if r < 0.3:
        key = rng.choice(list(keys) or ["k"])
        return (yaml_bomb() + f"{key}: *a8\n" + text).encode(), f"alias bomb at {key}"
    mutated, how = mutate_doc(rng, doc, keys)
    if has_raw(mutated) or rng.random() < 0.2:
        return dumps(mutated).encode("utf-8", "surrogatepass"), how + " (flow)"  # JSON is YAML
    try:
        return yaml.safe_dump(mutated, sort_keys=False, allow_unicode=rng.random() < 0.5).encode(), how
    except yaml.YAMLError:
        return dumps(mutated).encode("utf-8", "surrogatepass"), how + " (flow)"


# ------------------------------------------------------------------------------------------- text and JSON Lines


def mutate_text(rng: random.Random, text: str, others: Sequence[bytes] = ()) -> tuple[bytes, str]:
    """A text file mutated: byte mutations (which break UTF-8 too), or a text edit: emptied, blanked,
    repeated to a few hundred KB, NULs / a BOM / lone surrogates / CRLF / control characters spliced in."""
    if rng.random() < 0.6:
        return mutate_bytes(rng, text.encode(), others)
    kind = rng.choice(["empty", "blank", "repeat", "nul", "bom", "surrogate", "crlf", "control", "one-word"])
    at = rng.randrange(len(text) + 1)
    if kind == "empty":
        return b"", "empty"
    if kind == "blank":
        return (" \n\t" * rng.randint(1, 1000)).encode(), "whitespace only"
    if kind == "repeat":
        return (text * max(1, 300_000 // max(len(text), 1))).encode(), "repeated to ~300 KB"
    if kind == "one-word":
        return ("x" * rng.choice([10, 10_000, 200_000])).encode(), "one long word"
    insert = {"nul": "\x00" * 8, "bom": "\ufeff", "crlf": "\r\n\r", "control": "\x1b[2J\x07\x08\x0c",
              "surrogate": "\udcff\ud800"}[kind]
    return (text[:at] + insert + text[at:]).encode("utf-8", "surrogatepass"), f"{kind}@{at}"


def mutate_jsonl(rng: random.Random, records: list[Any], keys: Sequence[str] = ()) -> tuple[bytes, str]:
    """A JSON Lines file mutated: one record as a document (:func:`mutate_doc`), a line that is no object /
    deeply nested / not JSON, lines duplicated, dropped or blanked, or byte mutations of the whole file."""
    lines = [json.dumps(r) for r in records]
    r = rng.random()
    if r < 0.15:
        return mutate_bytes(rng, ("\n".join(lines) + "\n").encode())
    i = rng.randrange(len(lines))
    if r < 0.65:
        doc, how = mutate_doc(rng, records[i], keys)
        lines[i] = dumps(doc).replace("\n", "\\n")
        how = f"line {i + 1}: {how}"
    elif r < 0.8:
        bad = rng.choice(["[1, 2]", '"text"', "null", "42", "{", "}", "{}", '{"text": 1}{"text": 2}', "\x00",
                          "[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000, "9" * 5000, "NaN", "\ufeff{}"])
        lines.insert(i, bad)
        how = f"line {i + 1} := {_show(bad)}"
    else:
        kind = rng.choice(["dup", "drop", "blank", "all-blank", "crlf"])
        if kind == "dup":
            lines[i:i] = [lines[i]] * rng.choice([1, 100])
        elif kind == "drop":
            lines = lines[:i]
        elif kind == "blank":
            lines.insert(i, rng.choice(["", "  ", "\t", "\r"]))
        elif kind == "all-blank":
            lines = [""] * len(lines)
        else:
            lines = [line + "\r" for line in lines]
        how = f"{kind} at line {i + 1}"
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"), how


def mutate_text_dir(rng: random.Random, seed: Path, case: Path) -> str:
    """A directory of text files: one file mutated (:func:`mutate_text`), a file removed, an undecodable or empty
    file added, a directory named like a text file, or every file removed."""
    files = sorted(p.relative_to(seed).as_posix() for p in seed.rglob("*") if p.is_file())
    r = rng.random()
    if r < 0.6:
        target = rng.choice(files)
        blob, how = mutate_text(rng, (seed / target).read_text(encoding="utf-8", errors="replace"))
        clone_dir(seed, case, {target: blob})
        return f"{target}: {how}"
    if r < 0.7:
        target = rng.choice(files)
        clone_dir(seed, case, {target: None})
        return f"rm {target}"
    if r < 0.8:
        clone_dir(seed, case, {"zz.txt": rng.choice([b"", b"\xff\xfe\x00bad", b"\x80" * 100, b"\n\n"])})
        return "added a bad zz.txt"
    if r < 0.9:
        clone_dir(seed, case, {})
        (case / "dir.txt").mkdir()
        (case / "dir.txt" / "inner.md").write_bytes(rng.choice([b"", b"inner text", b"\xc3"]))
        return "a directory named dir.txt"
    clone_dir(seed, case, {f: None for f in files})
    return "every file removed"


# ------------------------------------------------------------------------------------------- safetensors


def mutate_safetensors(rng: random.Random, blob: bytes, others: Sequence[bytes] = ()) -> tuple[bytes, str]:
    """A mutated safetensors file: its header edited as a document (dtypes, shapes, offsets, duplicate
    names, metadata), the header length lying, or byte mutations leaning towards the header."""
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    r = rng.random()
    if r < 0.3:
        return mutate_bytes(rng, blob, others, hot=8 + n)
    names = [k for k in header if k != "__metadata__"]
    how = ""
    if r < 0.4 and names:  # a tensor's values: NaN/Inf patterns, boundary integers (indices, codes, zero-points)
        name = rng.choice(names)
        begin, end = header[name]["data_offsets"]
        buf = bytearray(blob)
        spots = []
        for _ in range(rng.randint(1, 4)):
            if end - begin < 4:
                break
            off = 8 + n + begin + rng.randrange((end - begin) // 4) * 4
            value = rng.choice([0x7FC00000, 0x7F800000, 0xFF800000, 0x7E007E00, 0x7C00FC00, 0xFFFFFFFF, 0x80000000,
                                0x7FFFFFFF, 0x00010000, 0x0000FFFF, rng.randrange(2**32)])
            buf[off:off + 4] = struct.pack("<I", value)
            spots.append(f"{off}={value:#x}")
        return bytes(buf), f"{name} data {spots}"
    if r < 0.7 and names:  # targeted edits of one tensor entry
        name = rng.choice(names)
        entry = header[name]
        field_name = rng.choice(["dtype", "dtype", "shape", "shape", "data_offsets", "data_offsets", "name"])
        if field_name == "dtype":
            entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I32", "I64", "I8", "U8", "BOOL", "F64", "I16",
                                         "U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F4", "X", "f32", 5, None])
            how = f"{name}.dtype={entry['dtype']!r}"
        elif field_name == "shape":
            shape = list(entry["shape"])
            op = rng.choice(["swap", "grow", "drop", "add", "huge", "neg", "zero", "type"])
            if op == "swap" and len(shape) > 1:
                shape = shape[::-1]
            elif op == "grow" and shape:
                i = rng.randrange(len(shape))
                shape[i] = shape[i] * 2
            elif op == "drop" and shape:
                shape = shape[:-1]
            elif op == "add":
                shape = shape + [1]
            elif op == "huge":
                shape = [rng.choice([2**31, 2**32, 2**62, 2**64 - 1])] + shape[1:] + ([0] if rng.random() < 0.5 else [])
            elif op == "neg" and shape:
                shape[0] = -shape[0]
            elif op == "zero":
                shape = [0] + shape[1:]
            else:
                shape = rng.choice([None, "1", [1.5], [[1]], 7])
            entry["shape"] = shape
            how = f"{name}.shape={shape!r}"
        elif field_name == "data_offsets":
            begin, end = entry["data_offsets"]
            new = rng.choice([[end, begin], [begin, end + 4], [begin + 4, end], [0, end - begin], [begin, 2**64 - 1],
                              [-1, end], [begin, len(data) + 8], [begin], [begin, end, end], "x", None])
            entry["data_offsets"] = new
            how = f"{name}.data_offsets={new!r}"
        else:
            other = rng.choice(["", "x", name + ".extra", name.replace("weight", "bias"), "__metadata__",
                                rng.choice(names)])
            header = {(other if k == name else k): v for k, v in header.items()}
            how = f"rename {name}→{other!r}"
        text = dumps(header)
    else:
        mutated, how = mutate_doc(rng, header, keys=("__metadata__", "dtype", "shape", "data_offsets"))
        text = dumps(mutated)
    raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * ((-len(raw)) % 8)
    length = len(raw)
    if rng.random() < 0.1:
        length = rng.choice([length - 1, length + 8, 0, 2**63, len(raw) + len(data) + 1])
        how += f"; header length={length}"
    return struct.pack("<Q", length % 2**64) + raw + data, how


# ------------------------------------------------------------------------------------------- directories


def clone_dir(seed: Path, dest: Path, replace: dict[str, bytes | None]) -> None:
    """``dest`` := a copy of ``seed`` (files hard-linked) with ``replace`` {relative path: new bytes, or None
    to delete it} applied."""
    fresh_dir(dest)
    for src in seed.rglob("*"):
        rel = src.relative_to(seed).as_posix()
        target = dest / rel
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif rel not in replace:
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
    for rel, blob in replace.items():
        if blob is not None:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(blob)


def mutate_file_of_dir(rng: random.Random, seed: Path, case: Path, target: str, keys: Sequence[str] = ()) -> str:
    """``case`` := ``seed`` with its file ``target`` mutated — a safetensors file's header or bytes, any other as
    a JSON document (``keys``: names worth inserting) — and how."""
    blob = (seed / target).read_bytes()
    if target.endswith(".safetensors"):
        blob, how = mutate_safetensors(rng, blob)
    else:
        blob, how = mutate_json_text(rng, json.loads(blob), keys)
    clone_dir(seed, case, {target: blob})
    return how


def fresh_dir(path: Path) -> Path:
    """``path`` as a new empty directory (whatever was there is removed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------- the case loop


class _Memory:
    """Extra memory of one case: peak RSS over the RSS at its start (or tracemalloc's peak)."""

    def __init__(self) -> None:
        self.rss = not USE_TRACEMALLOC and _can_reset_peak()
        self.kind = "peak RSS" if self.rss else "tracemalloc peak"
        self.base = 0

    def __enter__(self) -> _Memory:
        if not self.rss:
            tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.rss:
            tracemalloc.stop()

    def start(self) -> None:
        if self.rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb("VmRSS") << 10
        else:
            tracemalloc.reset_peak()
            self.base = tracemalloc.get_traced_memory()[0]

    def extra(self) -> int:
        if self.rss:
            return max(0, (_status_kb("VmHWM") << 10) - self.base)
        return tracemalloc.get_traced_memory()[1] - self.base


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {name}")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


@contextmanager
def bounded(seconds: float = CASE_SECONDS, limit: int = CASE_BYTES) -> Iterator[None]:
    """Assert that the block (ending normally or by an exception) stays within the fuzz bounds of one case."""
    with _Memory() as memory:
        memory.start()
        clock = _Clock()
        try:
            yield
        finally:
            elapsed, extra = clock.seconds(), memory.extra()
            assert elapsed < seconds, f"took {elapsed:.2f} s (bound {seconds} s)"
            assert extra < limit, f"{extra / 2**20:.0f} MB of extra memory ({memory.kind}; bound {limit >> 20} MB)"


class _Clock:
    """A case's time: the lesser of wall-clock and CPU time (all threads). A machine busy with other work (the
    other xdist worker, a parallel build) stretches the wall clock but not the CPU a case spends; threads that
    share the work stretch its CPU time but not the wall clock. A case waiting on nothing for seconds is caught
    by the wall-clock hang guard (HANG_SECONDS) instead."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return min(time.perf_counter() - self.wall, time.process_time() - self.cpu)


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


def error_kind(exc: BaseException, work: Path) -> str:
    """A LowbitError's type and message without its paths, numbers and quoted names (for counting kinds)."""
    msg = str(exc)[:400].replace(str(work), "")
    msg = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "'…'", msg)
    msg = re.sub(r"\(.*?\)|\[.*?\]|\{.*?\}", "(…)", msg)
    msg = re.sub(r"\d+", "N", msg)
    msg = re.sub(r"^[^:]*(?::N)?: ", "", msg)  # the leading file name (and line)
    return f"{type(exc).__name__}: {msg[:60]}"


def _where(exc: BaseException) -> str:
    """The innermost frame of the exception that lies in lowbit (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if "/lowbit/" in f.filename and "/tests/" not in f.filename]
    f = (mine or frames or [None])[-1]
    return "?" if f is None else f"{Path(f.filename).name}:{f.lineno} {f.name}"


@dataclass
class FuzzReport:
    """What :func:`run_cases` saw for one reader."""

    reader: str
    cases: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # typed-error kind → count
    failures: list[str] = field(default_factory=list)  # one line each, with the reproducer
    distinct: Counter = field(default_factory=Counter)  # (exception type @ frame) → count
    seconds: float = 0.0
    slowest: float = 0.0
    peak_bytes: int = 0
    memory_kind: str = ""
    fixed: int = 0  # failures this reader had, fixed, each with a regression test (filled in by the test)

    @property
    def rejected(self) -> int:
        return sum(self.errors.values())

    def summary(self, kinds: int = 12) -> str:
        head = (f"fuzz {self.reader}: {self.cases} cases (seed {MASTER_SEED}) in {self.seconds:.1f} s: {self.ok} read, "
                f"{self.rejected} rejected with a LowbitError ({len(self.errors)} kinds), {len(self.failures)} "
                f"failures; slowest {self.slowest * 1e3:.0f} ms, most extra memory {self.peak_bytes / 2**20:.1f} MB "
                f"({self.memory_kind})")
        lines = [head]
        lines += [f"  {count:6d}  {kind}" for kind, count in self.errors.most_common(kinds)]
        if len(self.errors) > kinds:
            lines.append(f"  {sum(c for _, c in self.errors.most_common()[kinds:]):6d}  ({len(self.errors) - kinds} "
                         "other kinds)")
        for where, count in self.distinct.most_common():
            lines.append(f"  FAILURE ×{count}: {where}")
        return "\n".join(lines)


def run_cases(reader: Callable[[Path], Any], make_case: Callable[[random.Random, Path], str], n: int, *, name: str,
              work: Path, warmup: Sequence[Callable[[Path], Any]] = (),
              check: Callable[[Any], None] | None = None) -> FuzzReport:
    """Run ``n`` fuzz cases of one reader and return the report (the caller asserts on ``report.failures``).

    ``make_case(rng, work / "case")`` writes case i's input (deterministic in ``rng``) and describes it;
    ``reader(path)`` reads it; ``check(result)``, when given, checks a successful read's result (an
    AssertionError there is a failure too). ``warmup`` callables run first, outside the bounds (lazy
    imports, caches): each gets the work directory.
    """
    report = FuzzReport(name)
    case_path = work / "case"
    for fn in warmup:
        fn(work)
    cases = [int(ONLY)] if ONLY is not None else range(n)
    start = time.perf_counter()
    with _Memory() as memory:
        report.memory_kind = memory.kind
        for i in cases:
            rng = random.Random(f"{name}:{MASTER_SEED}:{i}")
            how = make_case(rng, case_path)
            repro = f"{name} case {i}: LOWBIT_FUZZ_SEED={MASTER_SEED} LOWBIT_FUZZ_ONLY={i} ({how})"
            memory.start()
            clock = _Clock()
            problem = None
            error: Exception | None = None
            try:
                with _hang_guard(HANG_SECONDS):
                    result = reader(case_path)
                    if check is not None:
                        check(result)
                    del result
            except Exception as exc:  # noqa: BLE001 - the point: nothing but LowbitError may escape
                error = exc
            elapsed = clock.seconds()
            extra = memory.extra()
            if error is None:
                report.ok += 1
            elif isinstance(error, LowbitError):
                report.errors[error_kind(error, work)] += 1
            else:
                problem = f"{type(error).__name__} at {_where(error)}"
                report.failures.append(f"{repro}: {type(error).__name__}: {str(error)[:300]}")
            del error
            report.cases += 1
            report.slowest = max(report.slowest, elapsed)
            report.peak_bytes = max(report.peak_bytes, extra)
            if elapsed > CASE_SECONDS:
                problem = problem or "over the time bound"
                report.failures.append(f"{repro}: took {elapsed:.2f} s")
            if extra > CASE_BYTES:
                problem = problem or "over the memory bound"
                report.failures.append(f"{repro}: {extra / 2**20:.0f} MB of extra memory ({memory.kind})")
            if problem is not None:
                report.distinct[problem] += 1
    report.seconds = time.perf_counter() - start
    REPORTS.append(report)
    return report


def format_summary(reports: Sequence[FuzzReport]) -> list[str]:
    """The table ``make fuzz`` ends with: one row per reader."""
    header = (f"{'reader':<24} {'cases':>7} {'read':>7} {'typed':>7} {'kinds':>6} {'fail':>5} {'fixed':>6} "
              f"{'seconds':>8} {'slowest':>8} {'memory':>8}")
    rows = [header]
    for r in reports:
        rows.append(f"{r.reader:<24} {r.cases:>7} {r.ok:>7} {r.rejected:>7} {len(r.errors):>6} {len(r.failures):>5} "
                    f"{r.fixed:>6} {r.seconds:>8.1f} {r.slowest * 1e3:>6.0f}ms {r.peak_bytes / 2**20:>6.1f}MB")
    rows.append(f"{'total':<24} {sum(r.cases for r in reports):>7} {sum(r.ok for r in reports):>7} "
                f"{sum(r.rejected for r in reports):>7} {'':>6} {sum(len(r.failures) for r in reports):>5} "
                f"{sum(r.fixed for r in reports):>6} {sum(r.seconds for r in reports):>8.1f}")
    rows.append("read: cases read; typed: rejected with a LowbitError (kinds: distinct messages); fail: cases that "
                "ended otherwise; fixed: distinct failures fuzzing found and fixed, each with a regression test; "
                "memory: most extra memory of one case")
    return rows
