"""Adapters on a whole model: inject, switch, disable, delete, per-sample names, modules_to_save.

The model keeps its own class (a Hugging Face model stays one); lowbit records what it added in
``model.lowbit_peft`` (:class:`PeftState`). Each method registers a :class:`Method` here: layer
methods (LoRA, IA3, AdaLoRA, bottleneck) through :class:`LayerMethod`, model-level ones (prompt,
prefix tuning) with their own ``inject``/``state``/``load``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft.base import (AdapterLayer, LayerAdapter, adapter_layers, find_targets, target_matches,
                              unwrap_layer, wrap_layer)
from lowbit.peft.config import AdapterConfig

PREFIX = "base_model.model."  # peft's key prefix for tensors of the wrapped model


@dataclass
class PeftState:
    """What lowbit added to a model: configs by adapter name, the active names, the wrapped layers."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    layers: dict[str, list[str]] = field(default_factory=dict)  # adapter name → module names it touches
    saved_modules: dict[str, list[str]] = field(default_factory=dict)  # adapter name → modules_to_save names
    disabled: bool = False


class Method(Protocol):
    def inject(self, model: nn.Module, config: Any, name: str) -> list[str]: ...
    def state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]: ...
    def load(self, model: nn.Module, name: str, state: dict[str, torch.Tensor], where: str) -> None: ...
    def remove(self, model: nn.Module, name: str) -> None: ...
    def set_enabled(self, model: nn.Module, name: str, enabled: bool) -> None: ...


_METHODS: dict[str, Method] = {}


def register_method(peft_type: str, method: Method) -> None:
    _METHODS[peft_type] = method


def method_for(config: AdapterConfig) -> Method:
    _load_methods()
    try:
        return _METHODS[config.peft_type]
    except KeyError:
        raise InvalidSpecError(f"no adapter method registered for {config.peft_type!r}") from None


def _load_methods() -> None:
    import importlib

    for module in ("lora", "ia3", "adalora", "bottleneck", "prompt", "prefix"):
        try:
            importlib.import_module(f"lowbit.peft.{module}")
        except ModuleNotFoundError as exc:  # a method module not written yet
            if exc.name != f"lowbit.peft.{module}":
                raise


class LayerMethod:
    """A method that wraps linear layers: ``make(layer, config, name, module_name)`` builds one adapter."""

    def __init__(self, make: Callable[[AdapterLayer, Any, str, str], LayerAdapter],
                 skip: Callable[[nn.Module, Any], Sequence[str]] = lambda model, config: ()) -> None:
        self.make = make
        self.skip = skip

    def targets(self, model: nn.Module, config: Any) -> list[str]:
        return find_targets(model, config.target_modules, getattr(config, "exclude_modules", None),
                            type(config).__name__, extra_skip=self.skip(model, config))

    def inject(self, model: nn.Module, config: Any, name: str) -> list[str]:
        names = self.targets(model, config)
        for module_name in names:  # check every layer before changing any
            module = model.get_submodule(module_name)
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            check = getattr(self, "check", None)
            if check is not None:
                check(module_name, base, config)
        for module_name in names:
            layer = wrap_layer(model, module_name)
            if layer.merged_adapters:
                raise LowbitError(f"{module_name}: unmerge its adapters before adding another")
            layer.adapters[name] = self.make(layer, config, name, module_name)
            layer.adapters[name].to(layer.weight_device)
        return names

    def state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for module_name, layer in adapter_layers(model).items():
            if name in layer.adapters:
                for suffix, tensor in layer.adapters[name].peft_state().items():
                    out[f"{PREFIX}{module_name}.{suffix}"] = tensor
        return out

    def load(self, model: nn.Module, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        layers = {m: layer for m, layer in adapter_layers(model).items() if name in layer.adapters}
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            module_name, suffix = _split_key(key, layers)
            if module_name is None:
                raise LowbitError(f"{where}: tensor {key} belongs to no adapted layer of this model "
                                  f"(adapted: {', '.join(sorted(layers)[:5])} …)")
            grouped.setdefault(module_name, {})[suffix] = tensor
        missing = sorted(set(layers) - set(grouped))
        if missing:
            raise LowbitError(f"{where}: no adapter tensors for layer(s) {', '.join(missing[:5])}")
        for module_name, tensors in grouped.items():
            layers[module_name].adapters[name].load_peft_state(tensors, f"{where}: {module_name}")

    def remove(self, model: nn.Module, name: str) -> None:
        for module_name, layer in adapter_layers(model).items():
            if name in layer.adapters:
                del layer.adapters[name]
                layer.active_adapters = [a for a in layer.active_adapters if a != name]
                if not layer.adapters:
                    unwrap_layer(model, module_name)

    def set_enabled(self, model: nn.Module, name: str, enabled: bool) -> None:
        pass  # layers read the active list


def _split_key(key: str, layers: dict[str, Any]) -> tuple[str | None, str]:
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    best = None
    for module_name in layers:
        if body.startswith(module_name + ".") and (best is None or len(module_name) > len(best)):
            best = module_name
    if best is None:
        return None, ""
    return best, body[len(best) + 1:]


# ---- public API --------------------------------------------------------------------------
def peft_state(model: nn.Module) -> PeftState:
    state = getattr(model, "lowbit_peft", None)
    if state is None:
        state = PeftState()
        model.lowbit_peft = state  # type: ignore[attr-defined]
    return state


def apply_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *,
                  freeze_base: bool = True) -> nn.Module:
    """Add adapter ``adapter_name`` of ``config``'s method to ``model`` (in place) and make it the active,
    trainable one. The base's parameters are frozen (``freeze_base``). Returns ``model``."""
    if not isinstance(config, AdapterConfig):
        raise InvalidSpecError(f"expected an adapter config (lowbit.peft.LoraConfig …), got {type(config).__name__}")
    state = peft_state(model)
    if adapter_name in state.configs:
        raise InvalidSpecError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
    if not adapter_name or "." in adapter_name or adapter_name == "__base__":
        raise InvalidSpecError(f"bad adapter name {adapter_name!r} (no dots, not empty, not '__base__')")
    method = method_for(config)
    if freeze_base and not state.configs:
        for p in model.parameters():
            p.requires_grad_(False)
    layers = method.inject(model, config, adapter_name)
    state.configs[adapter_name] = config
    state.layers[adapter_name] = layers
    _apply_bias_mode(model, config, layers)
    state.saved_modules[adapter_name] = _add_modules_to_save(model, config, adapter_name)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapter(s); only the active adapters' parameters train."""
    state = peft_state(model)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise InvalidSpecError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    state.active = names
    for layer in adapter_layers(model).values():
        layer.active_adapters = [n for n in names if n in layer.adapters]
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name in names)
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            module.set_active(names)
    for name, config in state.configs.items():
        method_for(config).set_enabled(model, name, name in names and not state.disabled)


def active_adapters(model: nn.Module) -> list[str]:
    return list(peft_state(model).active)


def adapter_names(model: nn.Module) -> list[str]:
    return list(peft_state(model).configs)


def adapter_config(model: nn.Module, name: str = "default") -> AdapterConfig:
    state = peft_state(model)
    if name not in state.configs:
        raise InvalidSpecError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    return state.configs[name]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model runs as its base (adapters off)."""
    _set_disabled(model, True)
    try:
        yield
    finally:
        _set_disabled(model, False)


def _set_disabled(model: nn.Module, disabled: bool) -> None:
    """Turn every adapter of the model off (``disabled``) or back to the active set."""
    state = peft_state(model)
    state.disabled = disabled
    for module in model.modules():
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            module.disabled = disabled
    for name, config in state.configs.items():
        method_for(config).set_enabled(model, name, not disabled and name in state.active)


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Batch row i runs through adapter ``names[i]`` (``"__base__"``: no adapter), in one forward."""
    state = peft_state(model)
    unknown = sorted({n for n in names if n != "__base__" and n not in state.configs})
    if unknown:
        raise InvalidSpecError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    for name in set(names) - {"__base__"}:
        if state.configs[name].is_prompt_learning:
            raise InvalidSpecError(f"adapter {name!r}: per-sample names work with layer adapters, not "
                                   f"{state.configs[name].peft_type}")
    layers = list(adapter_layers(model).values())
    for layer in layers:
        layer.sample_adapters = list(names)
    try:
        yield
    finally:
        for layer in layers:
            layer.sample_adapters = None


def delete_adapter(model: nn.Module, name: str) -> None:
    state = peft_state(model)
    config = adapter_config(model, name)
    for layer in adapter_layers(model).values():
        if name in layer.merged_adapters:
            raise LowbitError(f"adapter {name!r} is merged into {layer.layer_name}; unmerge it first")
    method_for(config).remove(model, name)
    for module_name in state.saved_modules.pop(name, []):
        wrapper = model.get_submodule(module_name)
        if isinstance(wrapper, ModulesToSave):
            wrapper.remove(name)
            if not wrapper.copies:
                _set_module(model, module_name, wrapper.original_module)
    del state.configs[name]
    state.layers.pop(name, None)
    state.active = [a for a in state.active if a != name]
    if state.active:
        set_adapter(model, state.active)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (packed quantized buffers count as their weights' size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        from lowbit.nn.quant_linear import QuantLinear

        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features
    return trainable, total


# ---- bias modes and modules_to_save -------------------------------------------------------
def _apply_bias_mode(model: nn.Module, config: Any, layers: list[str]) -> None:
    mode = getattr(config, "bias", "none")
    if mode == "none":
        return
    if mode == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    elif mode == "lora_only":
        for module_name in layers:
            bias = getattr(model.get_submodule(module_name).base_layer, "bias", None)
            if bias is not None:
                bias.requires_grad_(True)
    else:
        raise InvalidSpecError(f"bias must be 'none', 'all' or 'lora_only', got {mode!r}")


class ModulesToSave(nn.Module):
    """A module trained in full next to the adapters (``modules_to_save``, e.g. a classifier head):
    the original stays untouched; each adapter gets its own trainable copy."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        copied.requires_grad_(True)
        self.copies[name] = copied

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def set_active(self, names: Sequence[str]) -> None:
        chosen = [n for n in names if n in self.copies]
        self.active = chosen[0] if chosen else None
        for name, module in self.copies.items():
            module.requires_grad_(name == self.active)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active is None:
            return self.original_module(*args, **kwargs)
        return self.copies[self.active](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original_module, name)


def default_modules_to_save(model: nn.Module, config: Any) -> list[str]:
    """peft's defaults: a sequence-classification head (``classifier`` / ``score``) trains in full."""
    wanted = list(getattr(config, "modules_to_save", None) or [])
    if getattr(config, "task_type", "") == "SEQ_CLS":
        for head in ("classifier", "score"):
            if head not in wanted and any(n == head or n.endswith("." + head) for n, _ in model.named_modules()):
                wanted.append(head)
    return wanted


def _add_modules_to_save(model: nn.Module, config: Any, adapter_name: str) -> list[str]:
    wanted = default_modules_to_save(model, config)
    if not wanted:
        return []
    names = [n for n, m in model.named_modules()
             if n and target_matches(wanted, n) and not isinstance(m, (ModulesToSave, AdapterLayer))
             and ".copies." not in f".{n}." and ".original_module" not in n]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not names:
        raise InvalidSpecError(f"modules_to_save {wanted} matches no module of this model")
    for module_name in names:
        module = model.get_submodule(module_name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_module(model, module_name, module)
        module.add(adapter_name)
    return names


def _saved_prefix(model: nn.Module, name: str) -> str:
    """peft's key prefix for modules_to_save: prompt-learning PeftModels hold the base model directly
    ('base_model.<module>'); tuner methods wrap it once more ('base_model.model.<module>')."""
    config = peft_state(model).configs.get(name)
    return "base_model." if config is not None and config.is_prompt_learning else PREFIX


def modules_to_save_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for module_name in peft_state(model).saved_modules.get(name, []):
        wrapper = model.get_submodule(module_name)
        for key, tensor in wrapper.copies[name].state_dict().items():
            out[f"{_saved_prefix(model, name)}{module_name}.{key}"] = tensor
    return out


def load_modules_to_save(model: nn.Module, name: str, state: dict[str, torch.Tensor], where: str) -> None:
    for module_name in peft_state(model).saved_modules.get(name, []):
        wrapper = model.get_submodule(module_name)
        target = wrapper.copies[name]
        prefix = f"{_saved_prefix(model, name)}{module_name}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        want = target.state_dict()
        for key, tensor in sub.items():
            if key in want and tuple(want[key].shape) != tuple(tensor.shape):
                raise LowbitError(f"{where}: {module_name}.{key} has shape {tuple(tensor.shape)}, the model needs "
                                  f"{tuple(want[key].shape)}")
        missing = sorted(set(want) - set(sub))
        if missing:
            raise LowbitError(f"{where}: modules_to_save {module_name} lacks {missing}")
        target.load_state_dict({k: v.to(want[k].dtype) for k, v in sub.items()})


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
