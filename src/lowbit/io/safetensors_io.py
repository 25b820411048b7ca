"""Safe reading of safetensors checkpoints (single file or sharded with an index), with typed errors."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lowbit.errors import CorruptFileError, ModelNotFoundError, UnsupportedModelError
from lowbit.models.resolve import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a model's weights, in a stable order."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptFileError(f"{index}: no 'weight_map' object")
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or Path(shard).name != shard:
                raise CorruptFileError(f"{index}: weight_map[{key!r}] must name a shard file in the model directory, "
                                       f"got {_show(shard)}")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CorruptFileError(f"{index}: names shard {f.name}, which does not exist in {model_dir}")
        return files
    if (model_dir / SINGLE_NAME).is_file():
        return [model_dir / SINGLE_NAME]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in _PICKLE_SUFFIXES for p in model_dir.iterdir()):
        raise UnsupportedModelError(f"{model_dir}: holds only pickle weights (*.bin/*.pt); lowbit loads safetensors only, "
                                    "since unpickling can run arbitrary code. Re-save the model with "
                                    "save_pretrained(..., safe_serialization=True)")
    raise ModelNotFoundError(f"{model_dir}: no *.safetensors weight files found")


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` with corrupt/truncated files reported as :class:`CorruptFileError` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as exc:
        raise CorruptFileError(f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}") from None
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read ({exc.strerror or exc})") from None


@contextmanager
def stream_tensors(path: Path) -> Iterator[tuple[list[str], Any]]:
    """(keys, get) for one file, reading each tensor with positional reads instead of mmap.

    The file is validated by ``safe_open`` first (typed errors for corrupt files); memory then
    holds only the tensor being processed, whatever the shard size.
    """
    from lowbit.io.st_format import read_header, read_tensor

    with open_safetensors(path) as handle:
        keys = list(handle.keys())
    header, data_start = read_header(path)
    with open(path, "rb") as f:
        yield keys, lambda key: read_tensor(f, header[key], data_start, f"{path}: tensor {key}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
