"""Transformer blocks read from the safetensors shards on demand (models larger than memory)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import CorruptFileError
from lowbit.io.st_format import read_header, read_tensor


class LazyBlocks:
    """Reads the deferred tensors of block i into the model when asked (positional reads, no mmap)."""

    def __init__(self, model: nn.Module, block_prefix: str, deferred: dict[str, tuple[Path, str]],
                 dtype: torch.dtype, quantized: set[str]) -> None:
        self.model = model
        self.block_prefix = block_prefix
        self.deferred = deferred
        self.dtype = dtype
        self.quantized = quantized
        self._headers: dict[Path, tuple[dict, int]] = {}

    def materialize(self, index: int) -> None:
        """Load block ``index``'s tensors (float ones cast to the load dtype), replacing its meta tensors."""
        from lowbit.io.checkpoint import checked_tensor

        prefix = f"{self.block_prefix}{index}."
        names = [n for n in self.deferred if n.startswith(prefix)]
        for name in names:
            file, key = self.deferred.pop(name)
            header, start = self._header(file)
            with open(file, "rb") as f:
                tensor = read_tensor(f, header[key], start, f"{file}: tensor {key}")
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            current = getattr(module, attr)
            tensor = checked_tensor(tensor, current, f"{file}: tensor {key}", name in self.quantized, self.dtype)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=current.requires_grad)
            else:
                module._buffers[attr] = tensor
        missing = [n for n, t in self.model.get_submodule(prefix[:-1]).named_parameters() if t.is_meta]
        if missing:
            raise CorruptFileError(f"checkpoint lacks tensor(s) of block {index}: {', '.join(missing[:5])}")

    def block_nbytes(self, index: int) -> int:
        """Bytes block ``index``'s tensors take once read (float ones at the load dtype)."""
        from lowbit.io.st_format import entry_dtype

        prefix = f"{self.block_prefix}{index}."
        total = 0
        for name, (file, key) in self.deferred.items():
            if not name.startswith(prefix):
                continue
            entry = self._header(file)[0][key]
            dtype = entry_dtype(entry, f"{file}: tensor {key}")
            if dtype.is_floating_point and name not in self.quantized:
                dtype = self.dtype
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
            total += numel * dtype.itemsize
        return total

    def _header(self, file: Path) -> tuple[dict, int]:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]
