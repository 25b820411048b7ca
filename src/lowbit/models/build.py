"""Build a transformers model from its config with parameters on the meta device (no memory, no init)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from lowbit.errors import CorruptFileError, UnsupportedModelError


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device; buffers (e.g. rotary tables) stay real.

    Buffers are usually small and computed in ``__init__``; loading never restores the
    non-persistent ones, so they must be built for real.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_empty_model(config_dict: dict[str, Any], where: str = "config.json") -> nn.Module:
    """Instantiate the architecture named in ``config_dict`` with meta parameters."""
    import transformers

    from lowbit.models.config_check import check_config

    model_type = config_dict.get("model_type")
    if not model_type:
        raise CorruptFileError(f"{where}: no 'model_type' field; is this a Hugging Face model config?")
    check_config(config_dict, where)  # typed errors naming the field, before transformers sees a value
    # lowbit reads outputs by name (.logits); transformers' own models also fail on return_dict=false
    values = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "return_dict")}
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not known to transformers "
                                    f"{transformers.__version__}")
    try:
        config = transformers.AutoConfig.for_model(**values)
    except Exception as exc:  # noqa: BLE001 — transformers' validation raises many types; all mean a bad value
        raise CorruptFileError(f"{where}: transformers rejects this {model_type} config: {_reason(exc)}") from None
    model_cls = _model_class(config, config_dict.get("architectures") or [], where)
    try:
        with params_on_meta(), _default_dtype(torch.float32):
            model = model_cls(config)
    except Exception as exc:  # noqa: BLE001 — a constructor failing on a checked config: still the config's fault
        raise CorruptFileError(f"{where}: cannot build {model_cls.__name__} from this config: {_reason(exc)}") from None
    model.eval()
    return model


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def _model_class(config: Any, architectures: list[str], where: str) -> type[nn.Module]:
    import transformers

    for name in architectures:
        cls = getattr(transformers, name, None) if not name.startswith("_") else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        mapping = getattr(auto, "_model_mapping", None)
        try:
            return mapping[type(config)]
        except (KeyError, TypeError):
            continue
    raise UnsupportedModelError(f"{where}: no transformers model class for architectures {architectures} "
                                f"/ model_type {config.model_type!r}")


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """{tied parameter → its source} for weights the config ties (e.g. lm_head → embed_tokens)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict):
        return {k: v for k, v in keys.items() if "*" not in k}
    # older transformers: a list of tied targets; the source is the input embedding
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


def output_head_name(model: nn.Module) -> str | None:
    """Module name of the output projection (lm_head), if the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None
