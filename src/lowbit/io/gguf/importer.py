"""``import_gguf``: a GGUF file (ours or llama.cpp's) → a lowbit model directory.

The file is parsed by lowbit's validating reader (every size checked before anything is
allocated). Tensors whose block type has an exact lowbit spec (Q4_0, Q5_0, Q8_0) stay quantized
(``keep_quantized``); the others are dequantized with lowbit's own block math to float32, which
equals ``gguf.quants.dequantize``. Q/K rows are un-permuted for llama; the tokenizer is rebuilt
from the file's ``tokenizer.ggml.*`` metadata. ``cached_import`` lets a ``.gguf`` path be a MODEL
everywhere (``eval``, ``generate``, ``quantize``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import GGUFError, UnsupportedModelError
from lowbit.io.gguf import arch as archmod
from lowbit.progress import progress

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ImportReport:
    out: str
    architecture: str
    tensors: int
    kept_quantized: list[str] = field(default_factory=list)
    dequantized: dict[str, int] = field(default_factory=dict)  # block type → tensors dequantized
    seconds: float = 0.0
    tokenizer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_gguf(path: str | Path, out: str | Path, *, keep_quantized: bool = True, dtype: str = "float32",
                overwrite: bool = False, show_progress: bool = True) -> ImportReport:
    """Convert ``path`` to a lowbit/Hugging Face model directory at ``out`` (atomically)."""
    from lowbit.io.gguf import quants
    from lowbit.io.gguf.reader import read_gguf
    from lowbit.io.gguf.tokenizer_import import write_tokenizer
    from lowbit.io.qconfig import make_quantization_config
    from lowbit.io.writer import ShardWriter, atomic_output_dir, write_json
    from lowbit.models.build import tied_parameter_names
    start = time.perf_counter()
    path = Path(path)
    if dtype not in _FLOAT_DTYPES:
        raise UnsupportedModelError(f"--dtype {dtype!r}: choose one of {', '.join(_FLOAT_DTYPES)}")
    gf = read_gguf(path)
    derived_table, derived = archmod.config_from_gguf(gf.metadata, str(path))
    stored = _stored_config(gf.metadata, derived_table, derived)
    table, config = stored or (derived_table, dict(derived))
    tied = "output.weight" not in gf.tensors
    config["tie_word_embeddings"] = tied
    if "token_embd.weight" not in gf.tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    config["vocab_size"] = int(gf.tensors["token_embd.weight"].shape[0])
    _special_ids(gf.metadata, config)
    try:
        model = _build(config, table, gf.metadata, str(path))
    except GGUFError:
        if stored is None:
            raise
        # the stored Hugging Face config (general.lowbit.hf_config) is unusable: trust the llama.cpp keys
        table, config = derived_table, {**derived, "tie_word_embeddings": tied, "vocab_size": config["vocab_size"]}
        _special_ids(gf.metadata, config)
        model = _build(config, table, gf.metadata, str(path))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n_head, n_kv, _ = archmod.head_dims(config)
    report = ImportReport(out=str(out), architecture=str(gf.metadata.get("general.architecture")), tensors=0)
    layer_specs: dict[str, Any] = {}
    written: set[str] = set()
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp)
        for name, info in progress(list(gf.tensors.items()), desc="import", enabled=show_progress, unit="tensor"):
            if name == "rope_freqs.weight":
                continue  # llama3 rope factors: carried by the config instead
            hf = archmod.hf_name(name)
            if hf is None or hf not in expected:
                raise UnsupportedModelError(f"{path}: tensor {name} has no place in {table.hf_architecture}; "
                                            "this GGUF is not a plain Llama-family model")
            shape = tuple(int(d) for d in info.shape)
            want = expected[hf]
            if shape != want:
                raise GGUFError(f"{path}: tensor {name} has shape {shape}, the metadata implies {want}")
            rows = gf.raw_rows(name)
            if len(shape) == 2 and table.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = n_head if "attn_q" in name else n_kv
                inverse = torch.argsort(archmod.qk_row_permutation(shape[0], heads))
                rows = rows[inverse]
            type_name = _type_name(info.ggml_type)
            module = hf.rsplit(".", 1)[0]
            kept = None
            if keep_quantized and len(shape) == 2 and hf.endswith(".weight") and _is_linear(model, module):
                kept = quants.to_quantized_weight(info.ggml_type, rows, shape)
            if kept is not None:
                scale = kept.tensors.get("scale")
                if scale is not None and not torch.isfinite(scale.float()).all():
                    raise GGUFError(f"{path}: tensor {name} ({type_name}) has NaN/Inf block scales")
                layer_specs[module] = kept.spec
                for key, tensor in kept.tensors.items():
                    writer.add(f"{module}.{key}", tensor)
                report.kept_quantized.append(name)
            else:
                flat_shape = shape if len(shape) == 2 else (1, shape[0])
                value = quants.dequantize(rows.reshape(flat_shape[0], -1), info.ggml_type, flat_shape)
                if not torch.isfinite(value).all():
                    raise GGUFError(f"{path}: tensor {name} ({type_name}) decodes to NaN/Inf values")
                writer.add(hf, value.reshape(shape).to(_FLOAT_DTYPES[dtype]).contiguous())
                report.dequantized[type_name] = report.dequantized.get(type_name, 0) + 1
            report.tensors += 1
            written.add(hf)
        tied_names = set(tied_parameter_names(model))
        missing = [k for k in expected if k not in written and k not in tied_names]
        if missing:
            raise GGUFError(f"{path}: the metadata describes a model with {len(missing)} tensor(s) the file lacks: "
                            + ", ".join(archmod.gguf_name(k) or k for k in missing[:4]) + (" …" if len(missing) > 4 else ""))
        writer.finish()
        if layer_specs:
            config["quantization_config"] = make_quantization_config(
                layer_specs, "gguf-import", {"gguf_source": {"file": path.name, "sha256_head": _head_hash(path)}})
        config["torch_dtype"] = dtype
        write_json(tmp / "config.json", config)
        try:
            report.tokenizer = write_tokenizer(gf.metadata, tmp, str(path))
        except (GGUFError, UnsupportedModelError):
            raise
        except Exception as exc:  # the tokenizers library rejects inconsistent vocabularies/merges
            raise GGUFError(f"{path}: the tokenizer metadata is inconsistent ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def cached_import(path: str | Path) -> Path:
    """A lowbit directory for ``path`` (a .gguf file), imported once into the cache and reused."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    root = Path(os.environ.get("LOWBIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                          Path.home() / ".cache") / "lowbit") / "gguf"
    out = root / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        import sys

        print(f"lowbit: importing {path.name} (first use; cached in {out})", file=sys.stderr)
        import_gguf(path, out, overwrite=True, show_progress=sys.stderr.isatty())
    return out


def _stored_config(meta: dict[str, Any], table: archmod.ArchTable, config: dict[str, Any]
                   ) -> tuple[archmod.ArchTable, dict[str, Any]] | None:
    """The file's own Hugging Face config when lowbit wrote one that agrees with the llama.cpp keys."""
    stored = meta.get("general.lowbit.hf_config")
    if not isinstance(stored, str):
        return None
    try:
        original = json.loads(stored)
    except (json.JSONDecodeError, RecursionError):
        return None
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if not isinstance(original, dict) or any(original.get(k) != config[k] for k in keys):
        return None
    original.pop("quantization_config", None)
    names = original.get("architectures")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    if name == table.hf_architecture:
        return table, original
    if name in archmod.ARCHS and archmod.ARCHS[name].gguf_arch == table.gguf_arch:
        return archmod.ARCHS[name], original  # e.g. a Mistral written as llama keeps its own class
    return None


def _build(config: dict[str, Any], table: archmod.ArchTable, meta: dict[str, Any], where: str) -> torch.nn.Module:
    """The empty model for ``config``; a config transformers rejects is a GGUFError, not a traceback."""
    from lowbit.models.build import build_empty_model

    try:
        return build_empty_model(config, where)
    except GGUFError:
        raise
    except Exception as exc:  # transformers raises many kinds on odd values; the file is what is wrong
        raise GGUFError(f"{where}: the metadata describes a model transformers cannot build "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _special_ids(meta: dict[str, Any], config: dict[str, Any]) -> None:
    for key, field_name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(value, int) and 0 <= value < config["vocab_size"]:
            config[field_name] = value


def _is_linear(model: torch.nn.Module, module_name: str) -> bool:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, torch.nn.Linear)


def _type_name(ggml_type: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(int(ggml_type)).name


def _head_hash(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(1 << 20)).hexdigest()
