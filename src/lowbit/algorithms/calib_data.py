"""Calibration data: token windows from a text file, JSONL, a directory of texts or a saved dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import CorruptFileError, InvalidSpecError, LowbitError, ModelNotFoundError

BUILTIN_CALIB = "builtin"


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration text comes from and how it is cut.

    ``source``: a .txt file, a .jsonl file (``field`` names the text field), a directory of .txt
    files, a ``datasets`` dataset saved with ``save_to_disk``, or ``"builtin"`` (the demo corpus).
    ``samples`` windows of ``seq_len`` tokens are drawn at random offsets, deterministic in ``seed``.
    """

    source: str = BUILTIN_CALIB
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    field: str = "text"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise InvalidSpecError(f"calibration needs samples ≥ 1 and seq_len ≥ 2 (got {self.samples}, {self.seq_len})")


def read_calibration_text(config: CalibConfig) -> str:
    """All calibration text from ``config.source``, joined with blank lines."""
    if config.source == BUILTIN_CALIB:
        from lowbit.models.resolve import builtin_dir

        return (builtin_dir("tiny-lm") / "calib.txt").read_text(encoding="utf-8")
    path = Path(config.source)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: calibration data not found")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            texts = _dataset_texts(path, config.field)
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".rst") and p.is_file())
            if not files:
                raise InvalidSpecError(f"{path}: directory holds no .txt/.md/.rst files or saved dataset")
            texts = [_read(p) for p in files]
    elif path.suffix == ".jsonl":
        texts = _jsonl_texts(path, config.field)
    else:
        texts = [_read(path)]
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise InvalidSpecError(f"{path}: calibration data is empty")
    return text


def calibration_batches(tokenizer: Any, config: CalibConfig) -> torch.Tensor:
    """[samples, seq_len] int64 token windows, drawn deterministically from the calibration text."""
    text = read_calibration_text(config)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < config.seq_len:
        raise InvalidSpecError(f"{config.source}: calibration text has {ids.numel()} tokens, fewer than one window "
                               f"of --calib-seq-len {config.seq_len}")
    windows = ids.numel() // config.seq_len
    if windows < config.samples:
        raise InvalidSpecError(f"{config.source}: calibration text has {ids.numel()} tokens = {windows} windows of "
                               f"{config.seq_len}; --calib-samples {config.samples} asks for more. Give more text or "
                               "fewer/shorter samples")
    g = torch.Generator().manual_seed(config.seed)
    starts = torch.randperm(windows, generator=g)[: config.samples] * config.seq_len
    return torch.stack([ids[s : s + config.seq_len] for s in starts.tolist()])


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSpecError(f"{path}: not UTF-8 text ({exc})") from None


def _jsonl_texts(path: Path, field: str) -> list[str]:
    from lowbit.io.jsonl import iter_jsonl

    texts = []
    for lineno, record in iter_jsonl(path, InvalidSpecError):
        if field not in record:
            raise InvalidSpecError(f"{path}:{lineno}: no field {field!r} (set --calib-field)")
        texts.append(str(record[field]))
    return texts


def _dataset_texts(path: Path, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise InvalidSpecError(f"{path}: is a saved `datasets` dataset; pip install datasets to read it") from None
    _check_arrow_files(path)
    try:
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if not data:
                raise InvalidSpecError(f"{path}: saved dataset has no splits")
            data = data["train"] if "train" in data else next(iter(data.values()))
        if field not in data.column_names:
            raise InvalidSpecError(f"{path}: dataset has no column {field!r}; columns: {data.column_names}")
        return [str(t) for t in data[field]]
    except LowbitError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets reports a damaged directory with many exception types
        reason = " ".join(str(exc).split())[:200]
        raise CorruptFileError(f"{path}: cannot read the saved dataset ({type(exc).__name__}: {reason})") from None


def _check_arrow_files(path: Path) -> None:
    """Validate (fully) every Arrow file the saved dataset's ``state.json`` files name, before ``datasets`` maps
    them: on some corrupt files pyarrow aborts the process (an uncaught C++ exception) instead of raising."""
    import pyarrow as pa

    from lowbit.models.resolve import read_json

    for state in sorted([*path.glob("state.json"), *path.glob("*/state.json")]):
        files = read_json(state).get("_data_files")
        if not isinstance(files, list):
            raise CorruptFileError(f"{state}: no '_data_files' list")
        seen: set[str] = set()
        for entry in files:
            name = entry.get("filename") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise CorruptFileError(f"{state}: _data_files entry {str(entry)[:60]!r} names no file of the dataset")
            if name in seen:  # datasets would map the file once per entry: 2,500 entries took 2.7 s and 380 MB
                raise CorruptFileError(f"{state}: _data_files names {name[:60]!r} more than once")
            seen.add(name)
            file = state.parent / name
            try:
                with pa.OSFile(str(file)) as source:
                    table = pa.ipc.open_stream(source).read_all()
                table.validate(full=True)
            except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: names/metadata that are not UTF-8
                raise CorruptFileError(f"{file}: not a valid Arrow stream ({' '.join(str(exc).split())[:200]})") from None
