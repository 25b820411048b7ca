"""Atomic output directories and a sharded safetensors writer that never holds the whole model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from lowbit.errors import OutputExistsError
from lowbit.io.safetensors_io import INDEX_NAME, SINGLE_NAME
from lowbit.io.st_format import StreamingFile

DEFAULT_SHARD_BYTES = 1 << 30


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``out``, on error removed.

    Readers never see a half-written ``out``: it appears (or is replaced) in one rename.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "previous")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ShardWriter:
    """Writes tensors as safetensors shards of about ``max_shard_bytes``, streaming them to disk.

    Each tensor's bytes go to disk as soon as it is added, so memory stays at one tensor whatever
    the model size. One shard is written as ``model.safetensors``; several as
    ``model-0000i-of-0000n.safetensors`` with a Hugging Face style ``model.safetensors.index.json``.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._current: StreamingFile | None = None
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        if self._current is None:
            path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
            self._current = StreamingFile(path)
            self._shards.append((path, []))
        self._current.add(name, tensor)
        self._shards[-1][1].append(name)
        self.total_bytes += tensor.numel() * tensor.element_size()
        if self._current.nbytes >= self.max_shard_bytes:
            self._close_current()

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def finish(self) -> list[Path]:
        self._close_current()
        if not self._shards:
            raise ValueError("no tensors were written")
        if len(self._shards) == 1:
            final = self.directory / SINGLE_NAME
            os.rename(self._shards[0][0], final)
            return [final]
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        finals = []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        write_json(self.directory / INDEX_NAME, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return finals
