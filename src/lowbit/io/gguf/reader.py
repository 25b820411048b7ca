"""Validated GGUF reader for untrusted files.

``gguf.GGUFReader`` trusts the counts it reads: a 65-byte file declaring a 2**40-element array makes
it allocate gigabytes (llama.cpp had CVEs in the same place: CVE-2024-23605, CVE-2025-53630,
CVE-2026-27940). This reader checks every count, length, offset and size it reads against the bytes
left in the file *before* it allocates or loops over anything, and reports a bad file as a
:class:`~lowbit.errors.GGUFError` naming the file, the field and the byte offset::

    path/model.gguf: metadata 'tokenizer.ggml.tokens' at byte 113: array of 1099511627776 STRING
    elements needs at least 8796093022208 bytes, but only 17 remain

Layout (GGUF v2/v3; little- or big-endian, detected from the version field)::

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv ×      (string key, u32 value type, value)
    n_tensors × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to ``alignment`` | tensor data (offsets relative to here, each aligned)

A string is ``u64 length`` + UTF-8 bytes; an array is ``u32 element type``, ``u64 count``, elements.

The file is memory-mapped copy-on-write once, at read time; the returned :class:`GGUFFile` keeps
that mapping, so :meth:`GGUFFile.tensor_bytes` views the very bytes that were validated (replacing
the file afterwards changes nothing; truncating it in place while it is mapped is not defended).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from lowbit.errors import GGUFError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
GGML_MAX_DIMS = 4
MAX_ARRAY_DEPTH = 2  # an array may hold arrays, which may not hold arrays
INT64_MAX = 2**63 - 1

#: Metadata value type: a :class:`gguf.GGUFValueType` int, or for an array ``(ARRAY, element_type)``.
ValueTypeTag = Union[int, tuple[int, int]]

_V = GGUFValueType
# value type -> (struct/numpy code, size in bytes) for fixed-size scalars
_SCALARS: dict[int, tuple[str, str, int]] = {
    _V.UINT8: ("B", "u1", 1), _V.INT8: ("b", "i1", 1), _V.BOOL: ("B", "u1", 1),
    _V.UINT16: ("H", "u2", 2), _V.INT16: ("h", "i2", 2),
    _V.UINT32: ("I", "u4", 4), _V.INT32: ("i", "i4", 4), _V.FLOAT32: ("f", "f4", 4),
    _V.UINT64: ("Q", "u8", 8), _V.INT64: ("q", "i8", 8), _V.FLOAT64: ("d", "f8", 8),
}
# smallest encoding of one value of each type: a string is at least its u64 length,
# an (inner) array at least its u32 element type and u64 count
_MIN_VALUE_BYTES: dict[int, int] = {**{t: s for t, (_, _, s) in _SCALARS.items()}, _V.STRING: 8, _V.ARRAY: 12}
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # non-empty key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # non-empty name, n_dims, one dim, type, offset
_KNOWN_GGML_TYPES = frozenset(int(t) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes lie and what they hold.

    ``ne`` is GGUF's dimension order (``ne[0]`` varies fastest, it is the row length); ``shape`` is
    torch order (``tuple(reversed(ne))``). ``offset`` is the absolute byte offset in the file and
    ``nbytes = n_elements / block_size * type_size`` for the ``ggml_type``'s block layout
    (``ggml_type`` is a :class:`gguf.GGMLQuantizationType`, an int).
    """

    name: str
    ggml_type: int
    ne: tuple[int, ...]
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        """Number of (logical, unquantized) elements: the product of ``ne``."""
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        """The ggml type's name, e.g. ``"Q4_0"``."""
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of ``ne[0]`` elements (whole quantization blocks)."""
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.ne[0] // block_size * type_size


@dataclass
class GGUFFile:
    """A validated GGUF file: header, metadata and tensor directory; tensor bytes on demand.

    ``metadata`` maps each key (file order) to a Python value: ``str`` for strings, ``int`` /
    ``float`` / ``bool`` for numbers, and a ``list`` for an array (nested arrays are lists of
    lists). Arrays are always lists, also numeric ones: simple for callers, and bounded, since every
    element was backed by bytes of the file (the decoded header, metadata and tensor directory, takes
    8-13x its encoded size at worst; tests/test_gguf_reader.py holds it under 16x).
    ``metadata_types`` gives each key's :class:`gguf.GGUFValueType` as an int, or for an array the
    tuple ``(ARRAY, element_type)`` (for an array of arrays, ``(ARRAY, ARRAY)``).
    ``tensors`` are in file order. ``byte_order`` is ``"<"`` (little-endian) or ``">"``; tensor
    bytes are returned as stored.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    metadata_types: dict[str, ValueTypeTag]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    byte_order: str = "<"
    _data: np.ndarray | None = field(default=None, repr=False, compare=False)

    def tensor_info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of ``name``; :class:`GGUFError` if the file has no such tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r} in this file") from None

    def tensor_bytes(self, name: str) -> torch.Tensor:
        """uint8 ``[nbytes]`` view of the tensor's bytes in the (copy-on-write) file mapping; no copy.

        Writing into the view never reaches the file, but is seen by later views of this GGUFFile.
        """
        info = self.tensor_info(name)
        if self._data is None:
            raise GGUFError(f"{self.path}: this GGUFFile holds no file mapping; open it with read_gguf()")
        end = info.offset + info.nbytes
        if info.offset < 0 or end > self._data.shape[0]:  # re-checked: TensorInfo is public, cheap insurance
            raise GGUFError(f"{self.path}: tensor {name!r} bytes [{info.offset}, {end}) lie outside the "
                            f"{self._data.shape[0]}-byte file")
        return torch.from_numpy(self._data[info.offset:end])

    def raw_rows(self, name: str) -> torch.Tensor:
        """uint8 ``[n_elements / ne[0], row_bytes]`` view: one row of ``ne[0]`` elements per line."""
        info = self.tensor_info(name)
        return self.tensor_bytes(name).view(info.n_elements // info.ne[0], info.row_bytes)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read and validate a GGUF file's header, metadata and tensor directory (tensor data stays mapped).

    Raises :class:`GGUFError` for a malformed, truncated or hostile file (naming file, field and byte
    offset) and :class:`ModelNotFoundError` if ``path`` does not exist. Never allocates or loops more
    than the file's size allows.
    """
    path = Path(path)
    return _Parser(path, _map_file(path)).parse()


def validate_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Alias of :func:`read_gguf` for call sites that only check a file: the GGUFFile, or a raise."""
    return read_gguf(path)


def _map_file(path: Path) -> mmap.mmap:
    """Map the file copy-on-write; opened non-blocking and checked to be a regular file (not a FIFO/device)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: file not found") from None
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError(f"{path}: not a regular file")
        if st.st_size == 0:
            raise GGUFError(f"{path}: header.magic at byte 0: empty file, expected the GGUF header")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        raise GGUFError(f"{path}: cannot map the file ({exc})") from None
    finally:
        os.close(fd)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _type_name(vtype: int) -> str:
    return GGUFValueType(vtype).name


class _Parser:
    """A cursor over the mapped file: every read checks the bytes left first."""

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path = path
        self.buf = buf  # struct.unpack_from and np.frombuffer read it in place; slicing copies only that slice
        self.size = len(buf)
        self.pos = 0
        self.order = "<"

    # -- primitives -------------------------------------------------------------------------
    def error(self, where: str, reason: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {where} at byte {self.pos if at is None else at}: {reason}")

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, where: str, what: str) -> int:
        """Advance over ``n`` bytes, returning where they start; raise if the file has fewer left."""
        if n > self.remaining:
            raise self.error(where, f"{what} needs {n} bytes, but only {self.remaining} remain (truncated file?)")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, code: str, n: int, where: str, what: str) -> Any:
        start = self.take(n, where, what)
        return struct.unpack_from(self.order + code, self.buf, start)[0]

    def u32(self, where: str, what: str) -> int:
        return int(self.scalar("I", 4, where, what))

    def u64(self, where: str, what: str) -> int:
        return int(self.scalar("Q", 8, where, what))

    def string(self, where: str, what: str) -> str:
        at = self.pos
        n = self.u64(where, f"{what} length")
        if n > self.remaining:
            raise self.error(where, f"{what} length {n} exceeds the {self.remaining} bytes left in the file", at)
        start = self.take(n, where, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(where, f"{what} is not valid UTF-8 ({exc.reason})", start + exc.start) from None

    def value_type(self, where: str, what: str) -> int:
        at = self.pos
        vtype = self.u32(where, what)
        if vtype not in _MIN_VALUE_BYTES:
            raise self.error(where, f"unknown {what} {vtype}", at)
        return GGUFValueType(vtype)

    # -- metadata values ----------------------------------------------------------------------
    def value(self, vtype: int, where: str, depth: int = 0) -> tuple[Any, ValueTypeTag]:
        """Decode one value of ``vtype`` (already validated); arrays recurse at most MAX_ARRAY_DEPTH deep."""
        if vtype == _V.STRING:
            return self.string(where, "string"), vtype
        if vtype == _V.ARRAY:
            return self.array(where, depth + 1)
        code, _, n = _SCALARS[vtype]
        at = self.pos
        val = self.scalar(code, n, where, f"{_type_name(vtype)} value")
        if vtype == _V.BOOL:
            if val > 1:
                raise self.error(where, f"BOOL value {val} is neither 0 nor 1", at)
            val = bool(val)
        return val, vtype

    def array(self, where: str, depth: int) -> tuple[list[Any], ValueTypeTag]:
        etype = self.value_type(where, "array element type")
        if etype == _V.ARRAY and depth >= MAX_ARRAY_DEPTH:
            raise self.error(where, f"arrays nested more than {MAX_ARRAY_DEPTH} deep", self.pos - 4)
        at = self.pos
        count = self.u64(where, "array length")
        need = count * _MIN_VALUE_BYTES[etype]
        if need > self.remaining:
            raise self.error(where, f"array of {count} {_type_name(etype)} elements needs at least {need} bytes, "
                                    f"but only {self.remaining} remain", at)
        tag = (_V.ARRAY, etype)
        if count == 0:
            return [], tag
        if etype in _SCALARS:
            return self.numeric_array(etype, count, where), tag
        if etype == _V.STRING:
            return self.string_array(count, where), tag
        return [self.array(f"{where}[{i}]", depth + 1)[0] for i in range(count)], tag

    def string_array(self, count: int, where: str) -> list[str]:
        """``count`` strings: :meth:`string` inlined (vocabularies hold 100k+ of them), same checks and errors."""
        buf, size, unpack = self.buf, self.size, struct.Struct(self.order + "Q").unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            at = self.pos
            if size - at >= 8:
                n = unpack(buf, at)[0]
                start = at + 8
                if n <= size - start:
                    try:
                        append(buf[start:start + n].decode("utf-8"))
                        self.pos = start + n
                        continue
                    except UnicodeDecodeError:
                        pass
            self.string(f"{where}[{i}]", "string")  # re-reads this bad string to raise the usual error
            raise self.error(f"{where}[{i}]", "string failed a check that passed on a second read", at)
        return out

    def numeric_array(self, etype: int, count: int, where: str) -> list[Any]:
        _, np_code, n = _SCALARS[etype]
        start = self.take(count * n, where, "array data")  # already bounded by the caller
        arr = np.frombuffer(self.buf, dtype=np.dtype(self.order + np_code), count=count, offset=start)
        if etype == _V.BOOL:
            bad = np.flatnonzero(arr > 1)
            if bad.size:
                i = int(bad[0])
                raise self.error(f"{where}[{i}]", f"BOOL value {int(arr[i])} is neither 0 nor 1", start + i)
            return arr.astype(bool).tolist()
        return arr.tolist()

    # -- sections ------------------------------------------------------------------------------
    def header(self) -> tuple[int, int, int]:
        start = self.take(4, "header.magic", "the GGUF magic")
        magic = bytes(self.buf[start:start + 4])
        if magic != GGUF_MAGIC:
            raise self.error("header.magic", f"magic {magic!r} is not {GGUF_MAGIC!r}; not a GGUF file", 0)
        start = self.take(4, "header.version", "the version")
        version = struct.unpack_from("<I", self.buf, start)[0]
        if version not in SUPPORTED_VERSIONS and version != 1:
            swapped = struct.unpack_from(">I", self.buf, start)[0]
            if swapped in SUPPORTED_VERSIONS:
                self.order, version = ">", swapped
        if version == 1:
            raise self.error("header.version", "GGUF version 1 (32-bit counts) is not supported; "
                                               "re-convert the model with a current llama.cpp", start)
        if version not in SUPPORTED_VERSIONS:
            raise self.error("header.version", f"unsupported GGUF version {version} (supported: 2, 3)", start)
        at = self.pos
        n_tensors = self.u64("header.n_tensors", "the tensor count")
        n_kv = self.u64("header.n_kv", "the metadata count")
        room = self.remaining
        if n_tensors > room // _MIN_TENSOR_INFO_BYTES:
            raise self.error("header.n_tensors", f"{n_tensors} tensors need at least "
                                                 f"{n_tensors * _MIN_TENSOR_INFO_BYTES} bytes of tensor info, "
                                                 f"but only {room} remain", at)
        if n_kv > room // _MIN_KV_BYTES:
            raise self.error("header.n_kv", f"{n_kv} metadata entries need at least {n_kv * _MIN_KV_BYTES} "
                                            f"bytes, but only {room} remain", at + 8)
        need = n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES
        if need > room:
            raise self.error("header.n_kv", f"{n_kv} metadata entries and {n_tensors} tensors need at least "
                                            f"{need} bytes, but only {room} remain", at + 8)
        return version, n_tensors, n_kv

    def metadata(self, n_kv: int) -> tuple[dict[str, Any], dict[str, ValueTypeTag], dict[str, int]]:
        values: dict[str, Any] = {}
        types: dict[str, ValueTypeTag] = {}
        where_at: dict[str, int] = {}
        for i in range(n_kv):
            at = self.pos
            key = self.string(f"metadata[{i}].key", "key")
            if not key:
                raise self.error(f"metadata[{i}].key", "empty key", at)
            where = f"metadata {key!r}"
            if key in values:
                raise self.error(where, f"duplicate metadata key (first at byte {where_at[key]})", at)
            vtype = self.value_type(where, "value type")
            values[key], types[key] = self.value(vtype, where)
            where_at[key] = at
        return values, types, where_at

    def alignment(self, values: dict[str, Any], types: dict[str, ValueTypeTag], where_at: dict[str, int]) -> int:
        if ALIGNMENT_KEY not in values:
            return DEFAULT_ALIGNMENT
        where, at = f"metadata {ALIGNMENT_KEY!r}", where_at[ALIGNMENT_KEY]
        if types[ALIGNMENT_KEY] != _V.UINT32:
            raise self.error(where, f"must be a UINT32, not {types[ALIGNMENT_KEY]!r}", at)
        alignment = values[ALIGNMENT_KEY]
        if alignment == 0 or alignment & (alignment - 1):
            raise self.error(where, f"alignment {alignment} is not a power of two", at)
        return int(alignment)

    def tensor_info(self, i: int, alignment: int) -> tuple[str, int, tuple[int, ...], int, int, int]:
        """One tensor-info record: (name, ggml_type, ne, relative offset, nbytes, where the offset was read)."""
        at = self.pos
        name = self.string(f"tensor[{i}].name", "tensor name")
        if not name:
            raise self.error(f"tensor[{i}].name", "empty tensor name", at)
        where = f"tensor {name!r}"
        at = self.pos
        n_dims = self.u32(f"{where}.n_dims", "n_dims")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise self.error(f"{where}.n_dims", f"n_dims {n_dims} is not in 1..{GGML_MAX_DIMS}", at)
        ne: list[int] = []
        numel = 1
        ne0_at = self.pos
        for d in range(n_dims):
            at = self.pos
            dim = self.u64(f"{where}.ne[{d}]", "dimension")
            if dim == 0 or dim > INT64_MAX:
                raise self.error(f"{where}.ne[{d}]", f"dimension {dim} is not in 1..2**63-1", at)
            numel *= dim
            if numel > INT64_MAX:
                raise self.error(f"{where}.ne[{d}]", "the product of the dimensions overflows int64", at)
            ne.append(dim)
        at = self.pos
        ggml_type = self.u32(f"{where}.type", "ggml type")
        if ggml_type not in _KNOWN_GGML_TYPES:
            raise self.error(f"{where}.type", f"unknown ggml type {ggml_type}", at)
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        if ne[0] % block_size:
            raise self.error(f"{where}.ne[0]", f"row length {ne[0]} is not a multiple of the "
                                               f"{GGMLQuantizationType(ggml_type).name} block size {block_size}",
                             ne0_at)
        at = self.pos
        offset = self.u64(f"{where}.offset", "data offset")
        if offset % alignment:
            raise self.error(f"{where}.offset", f"data offset {offset} is not a multiple of the alignment "
                                                f"{alignment}", at)
        return name, ggml_type, tuple(ne), offset, numel // block_size * type_size, at

    def tensors(self, n_tensors: int, alignment: int) -> tuple[dict[str, TensorInfo], int]:
        records: dict[str, tuple[str, int, tuple[int, ...], int, int, int]] = {}
        for i in range(n_tensors):
            at = self.pos
            record = self.tensor_info(i, alignment)
            if record[0] in records:
                raise self.error(f"tensor {record[0]!r}", "duplicate tensor name", at)
            records[record[0]] = record
        data_offset = _align(self.pos, alignment)
        tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, ne, offset, nbytes, at in records.values():
            start, end = data_offset + offset, data_offset + offset + nbytes
            if end > self.size:
                raise self.error(f"tensor {name!r}.offset", f"tensor data [{start}, {end}) runs past the end of "
                                                            f"the {self.size}-byte file", at)
            tensors[name] = TensorInfo(name, GGMLQuantizationType(ggml_type), ne, tuple(reversed(ne)), start, nbytes)
        by_start = sorted(tensors.values(), key=lambda t: t.offset)
        for prev, nxt in zip(by_start, by_start[1:]):
            if nxt.offset < prev.offset + prev.nbytes:
                raise self.error(f"tensor {nxt.name!r}.offset", f"tensor data [{nxt.offset}, "
                                                                f"{nxt.offset + nxt.nbytes}) overlaps tensor "
                                                                f"{prev.name!r} [{prev.offset}, "
                                                                f"{prev.offset + prev.nbytes})", records[nxt.name][5])
        return tensors, data_offset

    def parse(self) -> GGUFFile:
        version, n_tensors, n_kv = self.header()
        values, types, where_at = self.metadata(n_kv)
        alignment = self.alignment(values, types, where_at)
        tensors, data_offset = self.tensors(n_tensors, alignment)
        return GGUFFile(path=self.path, version=version, metadata=values, metadata_types=types, tensors=tensors,
                        alignment=alignment, data_offset=data_offset, file_size=self.size, byte_order=self.order,
                        _data=np.frombuffer(self.buf, dtype=np.uint8))
