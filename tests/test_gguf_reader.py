"""lowbit.io.gguf.reader: GGUFWriter files read back field by field (and as gguf.GGUFReader reads them),
and handcrafted hostile files, each rejected with a GGUFError naming file, field and byte, fast and small."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFReader, GGUFValueType as V, GGUFWriter
from gguf.quants import quantize

from gguf_support import overwrite  # noqa: E402
from lowbit.errors import GGUFError, ModelNotFoundError
from lowbit.io.gguf.reader import GGUFFile, read_gguf, validate_gguf



F32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]  # noqa: E731  what a FLOAT32 field holds

# (key, value, value type, array element type): every value type, arrays of numbers/strings/bools, nested
METADATA: list[tuple[str, Any, V, V | None]] = [
    ("t.u8", 200, V.UINT8, None), ("t.i8", -100, V.INT8, None),
    ("t.u16", 60000, V.UINT16, None), ("t.i16", -30000, V.INT16, None),
    ("t.u32", 4_000_000_000, V.UINT32, None), ("t.i32", -2_000_000_000, V.INT32, None),
    ("t.f32", 0.1, V.FLOAT32, None), ("t.bool_t", True, V.BOOL, None), ("t.bool_f", False, V.BOOL, None),
    ("t.str", "héllo, wörld ✓", V.STRING, None), ("t.u64", 2**64 - 1, V.UINT64, None),
    ("t.i64", -(2**63), V.INT64, None), ("t.f64", 1e-300, V.FLOAT64, None),
    ("t.tokens", ["<s>", "a", "", "ünï", "▁the"], V.ARRAY, V.STRING),
    ("t.scores", [0.0, -1.5, 3.25, 0.1], V.ARRAY, V.FLOAT32),
    ("t.types", [1, 2, 3, -4], V.ARRAY, V.INT32),
    ("t.bytes", [0, 255, 7], V.ARRAY, V.UINT8),
    ("t.big", [2**64 - 1, 0], V.ARRAY, V.UINT64),
    ("t.f64s", [1.5, -2.0], V.ARRAY, V.FLOAT64),
    ("t.flags", [True, False, True], V.ARRAY, V.BOOL),
    ("t.nested", [[1, 2], [3]], V.ARRAY, V.ARRAY),
]


def _expected(value: Any, vtype: V, sub: V | None) -> Any:
    if vtype == V.FLOAT32:
        return F32(value)
    if sub == V.FLOAT32:
        return [F32(v) for v in value]
    return value


def _tensors() -> dict[str, tuple[np.ndarray, Q | None, tuple[int, ...]]]:
    """name -> (array written, raw ggml type or None, logical torch-order shape)."""
    g = np.random.default_rng(0)
    w8 = g.standard_normal((4, 64)).astype(np.float32)
    w4 = g.standard_normal((2, 3, 32)).astype(np.float32)
    return {
        "blk.0.f32": (g.standard_normal((3, 32)).astype(np.float32), None, (3, 32)),
        "blk.0.f16": (g.standard_normal(64).astype(np.float16), None, (64,)),
        "blk.0.q8_0": (quantize(w8, Q.Q8_0), Q.Q8_0, (4, 64)),
        "blk.0.q4_0": (quantize(w4, Q.Q4_0), Q.Q4_0, (2, 3, 32)),
    }


def write_gguf(path: Path, *, endianess: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = None,
               tensors: bool = True) -> Path:
    w = GGUFWriter(path, "llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub in METADATA:
        w.add_key_value(key, value, vtype, sub_type=sub)
    if tensors:
        for name, (arr, raw, _) in _tensors().items():
            w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf")


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_every_field(written: Path) -> None:
    f = read_gguf(written)
    assert isinstance(f, GGUFFile) and f.path == written and f.version == 3 and f.byte_order == "<"
    assert f.alignment == 32 and f.data_offset % 32 == 0 and f.file_size == written.stat().st_size
    assert list(f.metadata) == ["general.architecture"] + [k for k, *_ in METADATA]
    assert f.metadata["general.architecture"] == "llama"
    for key, value, vtype, sub in METADATA:
        assert f.metadata[key] == _expected(value, vtype, sub), key
        assert f.metadata_types[key] == (vtype if sub is None else (V.ARRAY, sub)), key
    assert type(f.metadata["t.bool_t"]) is bool and type(f.metadata["t.u64"]) is int
    assert all(type(b) is bool for b in f.metadata["t.flags"])

    expected = _tensors()
    assert list(f.tensors) == list(expected)
    ends = []
    for name, (arr, raw, shape) in expected.items():
        info = f.tensors[name]
        assert info.name == name and info.shape == shape and info.ne == tuple(reversed(shape))
        assert info.ggml_type == (raw if raw is not None else {np.float32: Q.F32, np.float16: Q.F16}[arr.dtype.type])
        assert info.nbytes == arr.nbytes and info.offset % 32 == 0 and info.offset >= f.data_offset
        data = f.tensor_bytes(name)
        assert data.dtype == torch.uint8 and data.shape == (arr.nbytes,)
        assert data.numpy().tobytes() == arr.tobytes()
        rows = f.raw_rows(name)
        assert rows.shape == (int(np.prod(shape[:-1])), info.row_bytes)
        assert rows.reshape(-1).numpy().tobytes() == arr.tobytes()
        ends.append(info.offset + info.nbytes)
    assert max(ends) <= f.file_size
    assert validate_gguf(written).tensors == f.tensors


def test_agrees_with_gguf_reader_on_trusted_file(written: Path) -> None:
    ours, theirs = read_gguf(written), GGUFReader(written)
    assert ours.data_offset == theirs.data_offset and ours.alignment == theirs.alignment
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert keys == list(ours.metadata)
    for key in keys:
        field = theirs.fields[key]
        value, tag = ours.metadata[key], ours.metadata_types[key]
        if key == "t.nested":  # GGUFReader flattens nested arrays
            assert field.contents() == [x for inner in value for x in inner]
            continue
        assert field.contents() == value, key
        assert field.types[0] == (tag[0] if isinstance(tag, tuple) else tag)
        if isinstance(tag, tuple):
            assert field.types[-1] == tag[1]
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (t.tensor_type, t.data_offset, t.n_bytes, t.n_elements) == \
            (info.ggml_type, info.offset, info.nbytes, info.n_elements)
        assert t.shape.tolist() == list(info.ne)
        assert t.data.tobytes() == ours.tensor_bytes(t.name).numpy().tobytes()


def test_big_endian_and_custom_alignment(tmp_path: Path) -> None:
    f = read_gguf(write_gguf(tmp_path / "be.gguf", endianess=GGUFEndian.BIG, alignment=64))
    assert f.byte_order == ">" and f.alignment == 64 and f.metadata["general.alignment"] == 64
    for key, value, vtype, sub in METADATA:
        assert f.metadata[key] == _expected(value, vtype, sub), key
    for info in f.tensors.values():
        assert info.offset % 64 == 0
    arr = _tensors()["blk.0.f32"][0]
    assert f.tensor_bytes("blk.0.f32").numpy().tobytes() == arr.astype(">f4").tobytes()


def test_metadata_only_file(tmp_path: Path) -> None:
    f = read_gguf(write_gguf(tmp_path / "meta.gguf", tensors=False))
    assert f.tensors == {} and f.metadata["t.str"] == "héllo, wörld ✓"


def test_tensor_bytes_is_a_copy_on_write_view(written: Path) -> None:
    f = read_gguf(written)
    a, b = f.tensor_bytes("blk.0.q8_0"), f.tensor_bytes("blk.0.q8_0")
    before = written.read_bytes()
    a[0] ^= 0xFF
    assert b[0] == a[0]  # same mapping, no copy
    assert written.read_bytes() == before  # never written back
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        f.tensor_bytes("nope")


# ------------------------------------------------------------------------------- handcrafted files

ALIGN = 32


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def arr(etype: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", etype, count) + payload


def tinfo(name: str | bytes, ne: list[int], ggml_type: int = Q.F32, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<IQ", ggml_type, offset)


def build(kvs: list[bytes] = (), tinfos: list[bytes] = (), data: bytes = b"", n_kv: int | None = None,
          n_tensors: int | None = None, align: int = ALIGN) -> bytes:
    head = header(len(tinfos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tinfos)
    return body + bytes(-len(body) % align) + data


def two_tensors(off_a: int, off_b: int, ne_a: int = 8, ne_b: int = 8, total: int = 256) -> bytes:
    return build(tinfos=[tinfo("a", [ne_a], offset=off_a), tinfo("b", [ne_b], offset=off_b)], data=bytes(total))


def test_handcrafted_valid_file_with_gaps_and_any_order(tmp_path: Path) -> None:
    blob = build(kvs=[kv("general.name", V.STRING, s("x")), kv("v", V.ARRAY, arr(V.UINT16, 2, b"\x01\x00\x02\x00"))],
                 tinfos=[tinfo("late", [4, 2], Q.F32, 128), tinfo("early", [32], Q.Q8_0, 0)], data=bytes(160))
    (tmp_path / "ok.gguf").write_bytes(blob)
    f = read_gguf(tmp_path / "ok.gguf")
    assert list(f.tensors) == ["late", "early"]
    assert f.tensors["late"].offset == f.data_offset + 128 and f.tensors["late"].shape == (2, 4)
    assert f.tensors["early"].nbytes == 34 and f.metadata["v"] == [1, 2]
    assert f.raw_rows("late").shape == (2, 16)


def test_version_2_is_read(tmp_path: Path) -> None:
    blob = bytearray(build(kvs=[kv("a", V.UINT8, b"\x05")]))
    blob[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(bytes(blob))
    f = read_gguf(tmp_path / "v2.gguf")
    assert f.version == 2 and f.metadata == {"a": 5}


def _the_65_byte_file() -> bytes:
    blob = build(kvs=[kv("tokenizer", V.ARRAY, arr(V.UINT8, 2**40))], align=1) + bytes(8)
    assert len(blob) == 65
    return blob


TB = [tinfo("t", [8], offset=0)]  # a good tensor, 32 bytes of F32 data
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    # header
    "bad_magic": (lambda: b"GGML" + build()[4:], r"header\.magic at byte 0: magic"),
    "version_1": (lambda: header(0, 0, version=1) + bytes(8), r"header\.version at byte 4: GGUF version 1"),
    "version_4": (lambda: header(0, 0, version=4) + bytes(8), "unsupported GGUF version 4"),
    "version_0": (lambda: header(0, 0, version=0) + bytes(8), "unsupported GGUF version 0"),
    "n_tensors_2_40": (lambda: header(2**40, 0) + bytes(64), r"header\.n_tensors at byte 8: 1099511627776 tensors"),
    "n_tensors_u64_max": (lambda: header(2**64 - 1, 0) + bytes(64), r"header\.n_tensors"),
    "n_kv_2_63": (lambda: header(0, 2**63) + bytes(64), r"header\.n_kv at byte 16"),
    "n_kv_plus_n_tensors": (lambda: header(2, 4) + bytes(100), r"header\.n_kv.*4 metadata entries and 2 tensors"),
    # strings
    "key_length_2_62": (lambda: header(0, 1) + struct.pack("<Q", 2**62) + b"abcdefgh" * 2,
                        r"metadata\[0\]\.key at byte 24: key length 4611686018427387904 exceeds"),
    "key_length_2_63": (lambda: header(0, 1) + struct.pack("<Q", 2**63) + b"abcdefgh" * 2, "key length"),
    "key_length_u64_max": (lambda: header(0, 1) + struct.pack("<Q", 2**64 - 1) + bytes(16), "key length"),
    "string_length_2_63": (lambda: build([kv("k", V.STRING, struct.pack("<Q", 2**63) + b"xy")]),
                           r"metadata 'k' at byte 37: string length 9223372036854775808 exceeds"),
    "string_array_element_length": (lambda: build([kv("k", V.ARRAY, arr(V.STRING, 2, s("ok") + struct.pack(
        "<Q", 2**63 + 5) + b"zzzzzz"))]), r"metadata 'k'\[1\] at byte \d+: string length"),
    "bad_utf8_key": (lambda: build([kv(b"ab\xffcd", V.UINT8, b"\x00")]),
                     r"metadata\[0\]\.key at byte 34: key is not valid UTF-8"),
    "bad_utf8_value": (lambda: build([kv("k", V.STRING, s(b"\xc3\x28"))]), r"metadata 'k' at byte 45: string is not"),
    "bad_utf8_array": (lambda: build([kv("k", V.ARRAY, arr(V.STRING, 2, s("a") + s(b"\xed\xa0\x80")))]),
                       r"metadata 'k'\[1\] .*not valid UTF-8"),
    "bad_utf8_tensor_name": (lambda: build(tinfos=[tinfo(b"w\x80", [8])], data=bytes(32)),
                             r"tensor\[0\]\.name at byte 33: tensor name is not valid UTF-8"),
    "empty_key": (lambda: build([kv("", V.UINT8, b"\x00")]), r"metadata\[0\]\.key at byte 24: empty key"),
    "empty_tensor_name": (lambda: build(tinfos=[tinfo("", [8])], data=bytes(32)), "empty tensor name"),
    # value types and arrays
    "the_65_byte_2_40_array": (_the_65_byte_file, r"metadata 'tokenizer' at byte 49: array of 1099511627776 UINT8"),
    "string_array_2_40": (lambda: build([kv("k", V.ARRAY, arr(V.STRING, 2**40))]) + bytes(8), "array of .* STRING"),
    "array_count_2_63_u64": (lambda: build([kv("k", V.ARRAY, arr(V.UINT64, 2**63, bytes(8)))]), "array of"),
    "array_count_u64_max": (lambda: build([kv("k", V.ARRAY, arr(V.UINT8, 2**64 - 1, bytes(8)))]), "array of"),
    "nested_count_huge": (lambda: build([kv("k", V.ARRAY, arr(V.ARRAY, 2, arr(V.INT32, 2**50) + bytes(20)))]),
                          r"metadata 'k'\[0\] .*array of 1125899906842624 INT32"),
    "unknown_value_type": (lambda: build([kv("k", 13, bytes(8))]), r"metadata 'k' at byte 33: unknown value type 13"),
    "unknown_value_type_u32_max": (lambda: build([kv("k", 2**32 - 1, bytes(8))]), "unknown value type 4294967295"),
    "unknown_array_type": (lambda: build([kv("k", V.ARRAY, arr(99, 1, bytes(8)))]), "unknown array element type 99"),
    "nested_too_deep": (lambda: build([kv("k", V.ARRAY, arr(V.ARRAY, 1, arr(V.ARRAY, 1, arr(V.UINT8, 1, b"\x01"))))]),
                        r"metadata 'k'\[0\] .*nested more than 2 deep"),
    "duplicate_key": (lambda: build([kv("k", V.UINT8, b"\x01"), kv("k", V.UINT8, b"\x02")]),
                      r"metadata 'k' at byte 38: duplicate metadata key \(first at byte 24\)"),
    "bool_2": (lambda: build([kv("k", V.BOOL, b"\x02")]), "BOOL value 2 is neither 0 nor 1"),
    "bool_array_5": (lambda: build([kv("k", V.ARRAY, arr(V.BOOL, 3, b"\x01\x00\x05"))]),
                     r"metadata 'k'\[2\] at byte 51: BOOL value 5"),
    "alignment_0": (lambda: build([kv("general.alignment", V.UINT32, struct.pack("<I", 0))]), "alignment 0 is not"),
    "alignment_3": (lambda: build([kv("general.alignment", V.UINT32, struct.pack("<I", 3))]), "alignment 3 is not"),
    "alignment_u64": (lambda: build([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "must be a UINT32"),
    # tensors
    "n_dims_0": (lambda: build(tinfos=[tinfo("t", [])], data=bytes(32)), r"tensor 't'\.n_dims at byte 33: n_dims 0"),
    "n_dims_5": (lambda: build(tinfos=[tinfo("t", [1] * 5)], data=bytes(32)), "n_dims 5 is not in 1..4"),
    "n_dims_u32_max": (lambda: build(tinfos=[s("t") + struct.pack("<I", 2**32 - 1) + bytes(64)]), "n_dims 4294967295"),
    "dim_0": (lambda: build(tinfos=[tinfo("t", [8, 0])], data=bytes(32)), r"tensor 't'\.ne\[1\] .*dimension 0"),
    "dim_2_63": (lambda: build(tinfos=[tinfo("t", [2**63])], data=bytes(32)), "dimension 9223372036854775808"),
    "dims_product_overflow": (lambda: build(tinfos=[tinfo("t", [2**32, 2**32])], data=bytes(32)),
                              r"tensor 't'\.ne\[1\] at byte 45: the product of the dimensions overflows int64"),
    "dims_product_overflow_4d": (lambda: build(tinfos=[tinfo("t", [2**16] * 4)], data=bytes(32)), "overflows int64"),
    "huge_dims_no_overflow": (lambda: build(tinfos=[tinfo("t", [2**31, 2**31])], data=bytes(32)),
                              r"tensor 't'\.offset .*runs past the end"),
    "ne0_not_block_multiple": (lambda: build(tinfos=[tinfo("t", [16], Q.Q8_0)], data=bytes(64)),
                               r"tensor 't'\.ne\[0\] at byte 37: row length 16 is not a multiple of the Q8_0 "
                               r"block size 32"),
    "removed_ggml_type_4": (lambda: build(tinfos=[tinfo("t", [32], 4)], data=bytes(64)),
                            r"tensor 't'\.type at byte 45: unknown ggml type 4"),
    "ggml_type_1000": (lambda: build(tinfos=[tinfo("t", [32], 1000)], data=bytes(64)), "unknown ggml type 1000"),
    "misaligned_offset": (lambda: build(tinfos=[tinfo("t", [8], offset=1)], data=bytes(64)),
                          r"tensor 't'\.offset at byte 49: data offset 1 is not a multiple of the alignment 32"),
    "tensor_past_eof": (lambda: build(tinfos=[tinfo("t", [8], offset=32)], data=bytes(32)), "runs past the end"),
    "tensor_offset_2_63": (lambda: build(tinfos=[tinfo("t", [8], offset=2**63)], data=bytes(32)), "runs past"),
    "tensor_data_truncated": (lambda: build(tinfos=TB, data=bytes(31)), r"\[64, 96\) runs past the end of the 95-byte"),
    "overlap_same_offset": (lambda: two_tensors(0, 0), r"tensor 'b'\.offset .*overlaps tensor 'a'"),
    "overlap_partial": (lambda: two_tensors(0, 32, ne_a=16), "overlaps tensor 'a'"),
    "overlap_reversed_order": (lambda: two_tensors(64, 32, ne_b=16), r"tensor 'a'\.offset .*overlaps tensor 'b'"),
    "duplicate_tensor": (lambda: build(tinfos=[tinfo("t", [8]), tinfo("t", [8], offset=32)], data=bytes(64)),
                         r"tensor 't' at byte 57: duplicate tensor name"),
    "truncated_in_tensor_info": (lambda: build(tinfos=[tinfo("t" * 40, [8])])[:74],
                                 r"tensor 't{40}'\.n_dims at byte 72: n_dims needs 4 bytes, but only 2 remain"),
    "tiny_file": (lambda: b"GG", r"header\.magic at byte 0: the GGUF magic needs 4 bytes"),
    "header_only_truncated": (lambda: header(0, 0)[:20], r"header\.n_kv at byte 16"),
}


def _assert_rejected(path: Path, blob: bytes, match: str) -> GGUFError:
    path.write_bytes(blob)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(GGUFError, match=match) as info:
            read_gguf(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5, f"{elapsed:.2f} s"
    assert peak < 10 * 2**20, f"peak {peak} bytes"
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    return info.value


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_rejected_fast(tmp_path: Path, case: str) -> None:
    make, match = HOSTILE[case]
    err = _assert_rejected(tmp_path / f"{case}.gguf", make(), match)
    assert " at byte " in str(err)


def test_truncated_at_every_byte(written: Path, tmp_path: Path) -> None:
    """Every prefix shorter than the end of the last tensor's data is rejected; longer ones (padding) read."""
    full = written.read_bytes()
    good = read_gguf(written)
    needed = max(t.offset + t.nbytes for t in good.tensors.values())
    path = tmp_path / "cut.gguf"
    start = time.perf_counter()
    for n in range(len(full)):
        overwrite(path, full[:n])
        if n < needed:
            with pytest.raises(GGUFError):
                read_gguf(path)
        else:
            assert read_gguf(path).tensors == good.tensors
    assert time.perf_counter() - start < 30


def test_not_found_and_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="file not found"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty file"):
        read_gguf(tmp_path / "empty.gguf")
    os.mkfifo(tmp_path / "pipe.gguf")  # opened non-blocking: no hang waiting for a writer
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(tmp_path / "pipe.gguf")


N_BIG = 4000
LARGE_VALID: dict[str, Callable[[], bytes]] = {
    "many_small_keys": lambda: build([kv(f"k{i}", V.UINT8, b"\x01") for i in range(N_BIG)]),
    "int32_array": lambda: build([kv("k", V.ARRAY, arr(V.INT32, 8 * N_BIG, struct.pack("<i", 10**9) * (8 * N_BIG)))]),
    "string_array": lambda: build([kv("k", V.ARRAY, arr(V.STRING, 3 * N_BIG, s("ab") * (3 * N_BIG)))]),
    "many_tensors": lambda: build(tinfos=[tinfo(f"t{i}", [1], Q.I8, 32 * i) for i in range(N_BIG)],
                                  data=bytes(32 * N_BIG)),
}


@pytest.mark.parametrize("case", list(LARGE_VALID))
def test_decoded_header_memory_is_bounded(tmp_path: Path, case: str) -> None:
    """Valid but dense headers: Python objects take at most 16x the header's bytes (GGUFFile's docstring)."""
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(LARGE_VALID[case]())
    tracemalloc.start()
    try:
        f = read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * f.data_offset, f"{peak / f.data_offset:.1f}x"
