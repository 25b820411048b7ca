"""Our incremental safetensors writer/reader agree with the safetensors library byte for byte."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.io.st_format import DTYPE_NAMES, StreamingFile, read_header, read_tensor


def _sample(dtype: torch.dtype) -> torch.Tensor:
    base = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 10
    if dtype == torch.bool:
        return base > 0
    return base.to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=[DTYPE_NAMES[d] for d in DTYPE_NAMES])
def test_written_file_reads_back_with_safetensors(dtype: torch.dtype, tmp_path: Path) -> None:
    tensors = {"b.weight": _sample(dtype), "a.scalar": _sample(dtype)[0, 0], "c.empty": torch.empty(0, 4, dtype=dtype)}
    f = StreamingFile(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        f.add(name, t)
    f.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name].view(-1).view(torch.uint8) if t.numel() else
                                                             loaded[name], t.view(-1).view(torch.uint8) if t.numel() else t)


def test_reader_reads_library_written_file(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(7, 9), "q": torch.randint(0, 255, (4, 3), dtype=torch.uint8),
               "h": torch.randn(2, 2).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "y.safetensors")
    header, start = read_header(tmp_path / "y.safetensors")
    with open(tmp_path / "y.safetensors", "rb") as f:
        for name, t in tensors.items():
            assert torch.equal(read_tensor(f, header[name], start), t)
