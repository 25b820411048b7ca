"""JSON Lines: one reader for every JSONL input (training data, calibration text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def iter_jsonl(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for every non-blank line of ``path``.

    Bad JSON, a line that is not a JSON object and text that is not UTF-8 raise ``error`` (a lowbit
    error class) naming the file and line.
    """
    line_no = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise error(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise error(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
    except UnicodeDecodeError as exc:
        raise error(f"{path}:{line_no + 1}: not UTF-8 text ({exc.reason})") from None
