"""The safetensors byte layout, read and written incrementally.

A file is: 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (space-padded
to a multiple of 8), then the concatenated tensor bytes. Writing tensor by tensor to a data file
and prepending the header at the end, and reading one tensor by positional reads (no mmap, so
pages of tensors already processed do not stay resident), keep streaming memory at one tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from lowbit.errors import CorruptFileError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor entries, byte offset where tensor data starts). Assumes the file was validated by safe_open."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def entry_dtype(entry: dict, where: str) -> torch.dtype:
    """The torch dtype of a header entry; a dtype safetensors knows but lowbit does not read is an error."""
    dtype = NAME_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CorruptFileError(f"{where}: dtype {entry['dtype']}; lowbit reads {', '.join(NAME_DTYPES)}")
    return dtype


def read_tensor(f: BinaryIO, entry: dict, data_start: int, where: str = "tensor") -> torch.Tensor:
    """One tensor by positional read; the returned tensor owns its memory. ``where`` names it in errors."""
    dtype = entry_dtype(entry, where)
    begin, end = entry["data_offsets"]
    buf = bytearray(end - begin)
    if end > begin:
        f.seek(data_start + begin)
        f.readinto(buf)
    if not buf:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


class StreamingFile:
    """Append tensors one by one; :meth:`close` writes the final safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._entries: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(memoryview(raw))
        size = t.numel() * t.element_size()
        self._entries[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self.nbytes, self.nbytes + size]}
        self.nbytes += size

    def close(self, metadata: dict[str, str] | None = None) -> None:
        self._data.close()
        header = dict(sorted(self._entries.items()))
        header["__metadata__"] = metadata or {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 << 20)
        os.unlink(self._data_path)
