"""Uniform formats of the float reference: size, perplexity and per-layer error, cached on disk.

Each result is keyed by the reference's files (path, sizes, modification times), the spec, the
perplexity text and window, and the lowbit version, and kept as a small JSON file under
``$LOWBIT_CACHE_DIR/report`` (default ``~/.cache/lowbit/report``), so re-running a report (or
reporting several quantized variants of one model) quantizes and scores each format once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.formats.spec import QuantSpec

CACHE_VERSION = 1


@dataclass
class UniformResult:
    spec: str                 # QuantSpec.describe()
    size_bytes: int
    linear_bytes: int
    bits_per_weight: float
    ppl: float | None
    layer_errors: dict[str, float] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "size_bytes": self.size_bytes, "linear_bytes": self.linear_bytes,
                "bits_per_weight": self.bits_per_weight, "ppl": self.ppl, "layer_errors": self.layer_errors}


def cache_root() -> Path:
    base = os.environ.get("LOWBIT_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit")
    return Path(base) / "report"


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a model directory's weights: resolved path + (name, size, mtime) of its config and shards."""
    parts = [str(model_dir.resolve())]
    for path in sorted(model_dir.iterdir()):
        if path.name == "config.json" or path.suffix == ".safetensors":
            st = path.stat()
            parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(fingerprint: str, spec: QuantSpec | None, text_digest: str | None, seq_len: int) -> str:
    from lowbit import __version__

    payload = json.dumps({"v": CACHE_VERSION, "lowbit": __version__, "model": fingerprint,
                          "spec": None if spec is None else spec.to_dict(), "method": "rtn",
                          "text": text_digest, "seq_len": seq_len}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def text_digest(ids: torch.Tensor | None) -> str | None:
    if ids is None:
        return None
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:32]


def read_cached(key: str) -> dict[str, Any] | None:
    path = cache_root() / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_cached(key: str, data: dict[str, Any]) -> None:
    """Atomically store ``data`` (a failure to write the cache is not an error)."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=root)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, root / f"{key}.json")
    except OSError:
        pass


def uniform_result(reference: nn.Module, spec: QuantSpec, *, fingerprint: str | None,
                   ppl_fn: Callable[[nn.Module], float] | None, ids: torch.Tensor | None, seq_len: int,
                   use_cache: bool = True) -> UniformResult:
    """Quantize a copy of ``reference`` to ``spec`` by RTN (lm_head kept in float) and measure it.

    Raises LowbitError when the spec does not fit the model (e.g. a group size not dividing a layer).
    """
    key = cache_key(fingerprint, spec, text_digest(ids), seq_len) if fingerprint and use_cache else None
    if key is not None:
        cached = read_cached(key)
        if cached is not None and (cached.get("ppl") is not None or ppl_fn is None):
            return UniformResult(cached["spec"], int(cached["size_bytes"]), int(cached["linear_bytes"]),
                                 float(cached["bits_per_weight"]), cached.get("ppl"),
                                 {k: float(v) for k, v in cached.get("layer_errors", {}).items()}, cached=True)
    from lowbit.eval.size import model_size
    from lowbit.nn.quant_linear import QuantLinear
    from lowbit.quantize import quantize
    from lowbit.report.measure import reference_weight, relative_error

    model = quantize(copy.deepcopy(reference), spec)
    size = model_size(model)
    errors = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            errors[name] = relative_error(reference_weight(reference, name, module.weight.shape),
                                          module.weight.dequantize())
    ppl = ppl_fn(model) if ppl_fn is not None else None
    del model
    result = UniformResult(spec.describe(), size.size_bytes, size.linear_bytes, size.bits_per_weight, ppl, errors)
    if key is not None:
        write_cached(key, result.to_json())
    return result


def reference_ppl(reference: nn.Module, *, fingerprint: str | None, ppl_fn: Callable[[nn.Module], float],
                  ids: torch.Tensor, seq_len: int, use_cache: bool = True) -> tuple[float, bool]:
    """Perplexity of the float reference (cached like the uniform formats). Returns (ppl, from cache)."""
    key = cache_key(fingerprint, None, text_digest(ids), seq_len) if fingerprint and use_cache else None
    if key is not None:
        cached = read_cached(key)
        if cached is not None and isinstance(cached.get("ppl"), (int, float)):
            return float(cached["ppl"]), True
    ppl = ppl_fn(reference)
    if key is not None:
        write_cached(key, {"ppl": ppl})
    return ppl, False

