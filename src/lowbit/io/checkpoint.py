"""Load and save models: float Hugging Face directories and lowbit quantized directories alike."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import CorruptFileError, UnsupportedModelError
from lowbit.formats.act import ActSpec
from lowbit.io.qconfig import QUANT_METHOD, make_quantization_config, parse_activation_config, parse_quantization_config
from lowbit.io.safetensors_io import open_safetensors, weight_files
from lowbit.io.writer import DEFAULT_SHARD_BYTES, ShardWriter, atomic_output_dir, write_json
from lowbit.models.build import build_empty_model, tied_parameter_names
from lowbit.models.key_renames import KeyRenamer
from lowbit.models.resolve import read_json, resolve_model_dir
from lowbit.models.targets import linear_dims, set_submodule
from lowbit.nn.quant_linear import QuantLinear

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "quantize_config.json",
               "quant_config.json"}


def load(ref: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         lazy_blocks: bool = False) -> nn.Module:
    """Load a model directory (float Hugging Face, lowbit quantized, or ``builtin:NAME``).

    Only safetensors and JSON are read. Float tensors are cast to ``dtype``; quantized tensors
    keep their stored dtypes. The directory is remembered as ``model.lowbit_source``.
    With ``lazy_blocks`` the transformer blocks' weights stay on disk (meta tensors) until
    ``model.lowbit_lazy_blocks.materialize(i)`` reads block i — so a model larger than memory can be
    processed block by block (the calibration runner does this).
    """
    path = resolve_model_dir(ref)
    from lowbit.io.gptq_format import is_gptq_dir

    if is_gptq_dir(path):  # GPTQ-format checkpoints (AutoGPTQ, GPTQModel, lowbit export --format gptq)
        from lowbit.io.gptq_format import load_gptq

        return load_gptq(path, dtype=dtype, device=device)
    config_path = path / "config.json"
    config = read_json(config_path)
    layer_specs, method = quantized_layers(config, str(config_path))
    act_specs = parse_activation_config(config.get("quantization_config") or {}, str(config_path), layer_specs)
    model = build_empty_model(config, str(config_path))
    quantized_buffers = _install_quant_linears(model, layer_specs, str(config_path), act_specs)
    _install_shared_embeddings(model, config.get("quantization_config") or {}, layer_specs, str(config_path), dtype)
    if lazy_blocks:
        from lowbit.algorithms.calibrate import find_blocks
        from lowbit.io.lazy import LazyBlocks

        block_prefix = find_blocks(model)[0] + "."
        deferred = _load_weights(model, path, dtype, quantized_buffers, block_prefix)
        model.lowbit_lazy_blocks = LazyBlocks(model, block_prefix, deferred, dtype, quantized_buffers)  # type: ignore[attr-defined]
        model.lowbit_source = path  # type: ignore[attr-defined]
        model.lowbit_method = method if layer_specs else None  # type: ignore[attr-defined]
        return model.eval()  # blocks are materialised (on CPU) one at a time; move them yourself
    _load_weights(model, path, dtype, quantized_buffers)
    model.lowbit_source = path  # type: ignore[attr-defined]
    model.lowbit_method = method if layer_specs else None  # type: ignore[attr-defined]
    return model.to(device).eval()


def quantized_layers(config: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    qcfg = config.get("quantization_config")
    if not qcfg:
        return {}, "none"
    if not isinstance(qcfg, dict):
        raise CorruptFileError(f"{where}: quantization_config must be an object, got {type(qcfg).__name__}")
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise UnsupportedModelError(f"{where}: quantization_config.quant_method {qcfg.get('quant_method')!r} is not "
                                    "a lowbit checkpoint; lowbit reads float models and its own quantized ones")
    return parse_quantization_config(qcfg, where)


def _install_quant_linears(model: nn.Module, layer_specs: dict[str, Any], where: str,
                           act_specs: dict[str, ActSpec] | None = None) -> set[str]:
    """Swap the named linear layers for empty (meta) QuantLinears; return their stored-tensor names.

    Layers with a static act spec also get meta ``input_scale``/``input_zero`` buffers (float32 [1]).
    """
    act_specs = act_specs or {}
    from lowbit.formats.codecs import stored_layout

    names: set[str] = set()
    for name, spec in layer_specs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CorruptFileError(f"{where}: quantized module {name} does not exist in the model") from None
        in_features, out_features = linear_dims(module)
        layout = stored_layout(spec, (out_features, in_features))
        tensors = {t: torch.empty(shape, dtype=dt, device="meta") for t, (shape, dt) in layout.items()}
        act_spec = act_specs.get(name)
        qlinear = QuantLinear(in_features, out_features, spec, bias=getattr(module, "bias", None) is not None,
                              tensors=tensors, act_spec=act_spec)
        if act_spec is not None and not act_spec.dynamic:
            qlinear.input_scale = torch.empty(1, dtype=torch.float32, device="meta")
            qlinear.input_zero = torch.empty(1, dtype=torch.float32, device="meta")
            names.update((f"{name}.input_scale", f"{name}.input_zero"))
        set_submodule(model, name, qlinear)
        names.update(f"{name}.{t}" for t in layout)
    return names


def _install_shared_embeddings(model: nn.Module, qcfg: dict[str, Any], layer_specs: dict[str, Any], where: str,
                               dtype: torch.dtype) -> None:
    """Rebuild ``quantization_config.shared_embeddings`` ({embedding: quantized head}): embeddings that read
    their rows from a quantized head (the recipe option ``tied_head: share``)."""
    from lowbit.nn.quant_embedding import SharedQuantEmbedding

    shared = qcfg.get("shared_embeddings") or {}
    if not isinstance(shared, dict):
        raise CorruptFileError(f"{where}: quantization_config.shared_embeddings must be an object")
    for emb_name, head_name in shared.items():
        if not isinstance(head_name, str) or head_name not in layer_specs:
            raise CorruptFileError(f"{where}: quantization_config.shared_embeddings maps {emb_name} to {head_name!r}, "
                                   "which is not a quantized module")
        try:
            old = model.get_submodule(emb_name)
        except AttributeError:
            raise CorruptFileError(f"{where}: shared embedding {emb_name} does not exist in the model") from None
        head = model.get_submodule(head_name)
        if getattr(old, "embedding_dim", head.in_features) != head.in_features:
            raise CorruptFileError(f"{where}: embedding {emb_name} has dimension {old.embedding_dim}, its shared head "
                                   f"{head_name} has {head.in_features} input features")
        set_submodule(model, emb_name, SharedQuantEmbedding(head, getattr(old, "padding_idx", None), dtype))


def map_checkpoint_key(key: str, expected: set[str], prefix: str,
                       rename: Callable[[str], str] | None = None) -> str | None:
    """Model state-dict name for a checkpoint key, or None when the model has no such tensor.

    The key is taken as it is, else as ``rename`` (a :class:`lowbit.models.key_renames.KeyRenamer`:
    transformers' load-time renames, e.g. GPT-NeoX's ``embed_out`` → ``lm_head``) makes it; either
    form may also gain or lose the base-model prefix (``model.``, ``transformer.`` …).
    """
    candidates = [key]
    if rename is not None:
        renamed = rename(key)
        if renamed != key:
            candidates.append(renamed)
    for name in candidates:
        if name in expected:
            return name
    for name in candidates:
        if prefix and f"{prefix}.{name}" in expected:
            return f"{prefix}.{name}"
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in expected:
            return name[len(prefix) + 1:]
    return None


def _load_weights(model: nn.Module, path: Path, dtype: torch.dtype, quantized: set[str],
                  defer_prefix: str | None = None) -> dict[str, tuple[Path, str]]:
    """Load the checkpoint into ``model``; tensors under ``defer_prefix`` are left on the meta device
    and returned as {model name: (file, checkpoint key)} for :class:`lowbit.io.lazy.LazyBlocks`."""
    expected = model.state_dict()
    names = set(expected)
    prefix = getattr(model, "base_model_prefix", "") or ""
    rename = KeyRenamer(model)
    state: dict[str, torch.Tensor] = {}
    deferred: dict[str, tuple[Path, str]] = {}
    unmatched: list[str] = []
    for file in weight_files(path):
        with open_safetensors(file) as handle:
            for key in handle.keys():
                name = map_checkpoint_key(key, names, prefix, rename)
                if name is None:
                    unmatched.append(key)  # e.g. legacy attention-mask buffers; not part of the model
                    continue
                if defer_prefix is not None and name.startswith(defer_prefix):
                    deferred[name] = (file, key)
                    continue
                state[name] = checked_tensor(handle.get_tensor(key), expected[name], f"{file}: tensor {key}",
                                             name in quantized, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for target, source in tied_parameter_names(model).items():
        if target in state:
            continue
        if target not in names or source not in names:  # e.g. a quantized head or a shared embedding
            raise CorruptFileError(f"{path}: config.json ties {target} to {source} (tie_word_embeddings), but "
                                   f"{target if target not in names else source} is not a plain weight of this model")
        _set_parameter(model, target, model.get_parameter(source))
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_meta and n not in deferred]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        converted = [c for c in map(rename.converter_for, unmatched) if c is not None]
        hint = ("" if not converted else f" (transformers converts {', '.join(converted[:3])} on load — a tensor "
                "reshaping lowbit does not apply; it reads tensors as stored or renamed)")
        raise CorruptFileError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}{hint}")
    return deferred


def checked_tensor(tensor: torch.Tensor, want: torch.Tensor, where: str, quantized: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """A tensor read for the model's ``want``, checked: the same shape; a quantized layer's tensors keep their
    exact dtype, float ones must stay float (then cast to ``dtype``) and integer ones integer."""
    if tuple(tensor.shape) != tuple(want.shape):
        raise CorruptFileError(f"{where} has shape {tuple(tensor.shape)}, the model expects {tuple(want.shape)}")
    if quantized:
        if tensor.dtype != want.dtype:
            raise CorruptFileError(f"{where} has dtype {tensor.dtype}, expected {want.dtype}")
        return tensor
    if tensor.is_floating_point() != want.is_floating_point():
        raise CorruptFileError(f"{where} has dtype {tensor.dtype}; the model's tensor is "
                               f"{'floating point' if want.is_floating_point() else want.dtype}")
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, param)


def save(model: nn.Module, out: str | Path, *, overwrite: bool = False, source_dir: str | Path | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (float or quantized) as safetensors + config.json (+ tokenizer files).

    Tokenizer and other non-weight files are copied from ``source_dir`` (default: the directory the
    model was loaded from). The output appears atomically; nothing half-written is left on error.
    """
    out = Path(out)
    source = Path(source_dir) if source_dir is not None else getattr(model, "lowbit_source", None)
    tied = tied_parameter_names(model)
    layer_specs = {name: m.spec for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    act_specs = {name: m.act_spec for name, m in model.named_modules()
                 if isinstance(m, QuantLinear) and m.act_spec is not None}
    from lowbit.models.targets import shared_embeddings

    shared = shared_embeddings(model)
    if shared:
        extra_config = {**(extra_config or {}), "shared_embeddings": shared}
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        state = model.state_dict()
        for name, tensor in state.items():
            source_tensor = state.get(tied.get(name, ""))
            if source_tensor is not None and source_tensor.data_ptr() == tensor.data_ptr():
                continue  # tied copy: restored from its source on load
            writer.add(name, tensor)
        writer.finish()
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        if not config.get("architectures"):
            config["architectures"] = [type(model).__name__]
        if layer_specs:
            config["quantization_config"] = make_quantization_config(
                layer_specs, getattr(model, "lowbit_method", None) or "rtn", extra_config, act_specs)
        write_json(tmp / "config.json", config)
        if source is not None:
            copy_aux_files(Path(source), tmp)
    return out


def copy_aux_files(source: Path, dest: Path) -> None:
    """Copy tokenizer files and other non-weight files (sentence-transformers modules too)."""
    for item in source.iterdir():
        if item.name in _SKIP_FILES or item.name.startswith(".") or item.suffix in _WEIGHT_SUFFIXES:
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name, ignore=shutil.ignore_patterns(*(f"*{s}" for s in _WEIGHT_SUFFIXES)))
        else:
            shutil.copy2(item, dest / item.name)
