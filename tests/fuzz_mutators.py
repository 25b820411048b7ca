"""Mutators for the seeded fuzzers (fuzz_support.py runs the cases): bytes (flips, splices, boundary integers,
truncation), JSON/YAML documents (values near and at the boundaries, wrong types, duplicate keys, deep nesting,
alias bombs), text and JSON Lines, safetensors headers and offsets, and seed directories cloned with one file
replaced. Every mutator is deterministic in the ``random.Random`` it is given and describes what it did."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


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
