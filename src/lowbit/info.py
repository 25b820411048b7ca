"""``lowbit info``: describe a model directory from its config and safetensors headers (no weights read)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lowbit.io.checkpoint import quantized_layers
from lowbit.io.safetensors_io import open_safetensors, weight_files
from lowbit.models.resolve import read_json, resolve_model_dir

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def describe(ref: str | Path) -> dict[str, Any]:
    path = resolve_model_dir(ref)
    config = read_json(path / "config.json")
    specs, method = quantized_layers(config, str(path / "config.json"))
    files = weight_files(path)
    tensors = 0
    size = 0
    for file in files:
        with open_safetensors(file) as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                size += numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
                tensors += 1
    info: dict[str, Any] = {
        "path": str(path),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers", config.get("n_layer")),
        "hidden_size": config.get("hidden_size", config.get("n_embd")),
        "vocab_size": config.get("vocab_size"),
        "weight_files": len(files),
        "tensors": tensors,
        "size_bytes": size,
        "quantized": bool(specs),
    }
    if specs:
        qcfg = config["quantization_config"]
        info.update({"method": method, "format_version": qcfg.get("format_version"),
                     "lowbit_version": qcfg.get("lowbit_version"), "quantized_modules": len(specs),
                     "spec_counts": dict(Counter(s.describe() for s in specs.values()))})
    return info
