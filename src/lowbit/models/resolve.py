"""Turn a model reference (``builtin:NAME``, a directory) into a checked directory path."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from lowbit.errors import CorruptFileError, ModelNotFoundError

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"tiny-lm": "tiny-lm"}  # name → folder under lowbit/data/


def builtin_dir(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise ModelNotFoundError(f"unknown built-in model {BUILTIN_PREFIX}{name}; available: "
                                 + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
    path = Path(str(resources.files("lowbit") / "data" / BUILTIN_MODELS[name]))
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"built-in model {BUILTIN_PREFIX}{name} is missing from the installation ({path})")
    return path


def resolve_model_dir(ref: str | Path) -> Path:
    """Directory holding ``config.json`` for ``ref`` (a ``builtin:`` name, a directory, or a ``.gguf`` file,
    which is imported into lowbit's cache on first use)."""
    text = str(ref)
    if text.startswith(BUILTIN_PREFIX):
        return builtin_dir(text[len(BUILTIN_PREFIX):])
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory (expected a model directory, a .gguf file or "
                                 "builtin:tiny-lm)")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from lowbit.io.gguf.importer import cached_import

        return cached_import(path)  # validated, imported once, reused
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: is a file; expected a model directory holding config.json and "
                                 "*.safetensors, or a .gguf file")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: no config.json found; expected a Hugging Face or lowbit model directory")
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: file not found") from None
    except RecursionError:
        raise CorruptFileError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # bad syntax, not UTF-8, an integer past Python's digit limit
        raise CorruptFileError(f"{path}: invalid JSON ({exc})") from None
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object at the top level")
    return data
