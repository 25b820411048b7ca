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
                except RecursionError:
                    raise error(f"{path}:{line_no}: invalid JSON (nested too deeply)") from None
                except ValueError as exc:  # e.g. an integer past Python's digit limit
                    raise error(f"{path}:{line_no}: invalid JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise error(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                if "\\u" in line and not _is_text(record):
                    raise error(f"{path}:{line_no}: a string holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                                "without its pair), which is not text")
                yield line_no, record
    except UnicodeDecodeError as exc:
        raise error(f"{path}:{line_no + 1}: not UTF-8 text ({exc.reason})") from None


def _is_text(record: dict[str, Any]) -> bool:
    """Whether every string in ``record`` (keys too) is valid Unicode: JSON's \\u escapes can write half a
    surrogate pair, which no text encoder accepts."""
    stack: list[Any] = [record]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return True
