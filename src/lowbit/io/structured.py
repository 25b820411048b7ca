"""Read a user's JSON or YAML file (recipes, plans) with one typed error for every way it can fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError


def load_json_or_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of ``path`` (YAML for ``.yaml``/``.yml``, else JSON; YAML read with ``safe_load``).

    Raises InvalidSpecError naming the file and ``what`` it should have been when it cannot be read or parsed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSpecError(f"{path}: cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            # LibYAML's safe loader when PyYAML has it: it refuses nesting past 1000 levels at once, where the
            # pure-Python scanner takes seconds to reach its RecursionError
            return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        return json.loads(text)
    except Exception as exc:  # noqa: BLE001 - JSON and YAML raise different types
        raise InvalidSpecError(f"{path}: cannot parse {what} ({exc})") from None
