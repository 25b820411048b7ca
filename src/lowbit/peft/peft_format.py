"""Hugging Face peft's on-disk adapter format, both ways.

A directory with ``adapter_config.json`` (peft's config keys, ``peft_type``, ``task_type``) and
``adapter_model.safetensors`` whose keys are peft's: ``base_model.model.<module>.lora_A.weight``,
``….lora_magnitude_vector``, ``….ia3_l``, ``prompt_embeddings`` … (the adapter name is not in the
key). Written atomically; only JSON and safetensors are read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFileError, LowbitError, ModelNotFoundError
from lowbit.io.writer import atomic_output_dir, write_json
from lowbit.models.resolve import read_json
from lowbit.peft.config import AdapterConfig, config_from_peft_dict
from lowbit.peft.model import (
    adapter_config,
    apply_adapter,
    load_modules_to_save,
    method_for,
    modules_to_save_state,
    peft_state,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names (float32 copies on CPU)."""
    config = adapter_config(model, name)
    state = dict(method_for(config).state(model, name))
    state.update(modules_to_save_state(model, name))
    if getattr(config, "bias", "none") != "none":
        state.update(_bias_state(model, name, config))
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def saved_config(model: nn.Module, name: str = "default") -> dict[str, Any]:
    config = adapter_config(model, name)
    data = config.to_peft_dict()
    fix = getattr(method_for(config), "saved_config", None)  # e.g. PiSSA saved as rank-2r LoRA
    if fix is not None:
        data = fix(model, name, data)
    data.setdefault("base_model_name_or_path", _source(model))
    data["peft_version"] = data.get("peft_version") or "lowbit"
    return data


def save_adapter(model: nn.Module, out: str | Path, name: str = "default", *, overwrite: bool = False) -> Path:
    """Write adapter ``name`` as a peft adapter directory (``PeftModel.from_pretrained`` reads it)."""
    from safetensors.torch import save_file

    out = Path(out)
    state = adapter_state_dict(model, name)
    config = saved_config(model, name)
    with atomic_output_dir(out, overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, config)
    return out


def read_adapter_config(path: str | Path) -> AdapterConfig:
    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: adapter directory not found")
    if not file.is_file():
        raise CorruptFileError(f"{path}: no {CONFIG_NAME} (not a peft adapter directory)")
    return config_from_peft_dict(read_json(file), str(file))


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        if (Path(path) / "adapter_model.bin").is_file():
            raise CorruptFileError(f"{path}: only adapter_model.bin (pickle) is present; lowbit reads safetensors "
                                   "only (re-save it with safe_serialization=True)")
        raise CorruptFileError(f"{path}: no {WEIGHTS_NAME}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{file}: cannot read safetensors ({exc})") from None


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", *, trainable: bool = False) -> nn.Module:
    """Add the peft adapter at ``path`` to ``model`` as ``name`` (in place) and activate it.

    Shapes are checked layer by layer (the error names the layer and both shapes); tensors the
    model has no place for, and adapted layers without tensors, are errors too.
    """
    config = read_adapter_config(path)
    if hasattr(config, "init_lora_weights"):
        config = dataclasses.replace(config, init_lora_weights=True)
    tensors = read_adapter_tensors(path)
    where = str(Path(path) / WEIGHTS_NAME)
    apply_adapter(model, config, name)
    try:
        method_state = dict(tensors)
        saved = modules_to_save_state(model, name)
        for key in saved:
            method_state.pop(key, None)
        load_modules_to_save(model, name, tensors, where)
        if getattr(config, "bias", "none") != "none":
            _load_bias(model, name, config, method_state, where)
        method_for(config).load(model, name, method_state, where)
    except Exception:
        from lowbit.peft.model import delete_adapter

        delete_adapter(model, name)
        raise
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _bias_state(model: nn.Module, name: str, config: Any) -> dict[str, torch.Tensor]:
    from lowbit.peft.model import PREFIX

    state = {}
    layers = set(peft_state(model).layers.get(name, []))
    for module_name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.Tensor) or not bias.requires_grad:
            continue
        clean = module_name.replace(".base_layer", "")
        if config.bias == "lora_only" and clean not in layers:
            continue
        state[f"{PREFIX}{clean}.bias"] = bias
    return state


def _load_bias(model: nn.Module, name: str, config: Any, state: dict[str, torch.Tensor], where: str) -> None:
    live = _bias_state(model, name, config)
    for key in list(state):
        if key in live:
            tensor = state.pop(key)
            if tensor.shape != live[key].shape:
                raise LowbitError(f"{where}: {key} has shape {tuple(tensor.shape)}, the model needs "
                                  f"{tuple(live[key].shape)}")
            with torch.no_grad():
                live[key].copy_(tensor)


def _source(model: nn.Module) -> str | None:
    source = getattr(model, "lowbit_source", None)
    return None if source is None else str(source)
