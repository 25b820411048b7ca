"""Prefix tuning (peft's PREFIX_TUNING): learned keys and values in front of every attention layer.

The adapter holds, per virtual token, one key and one value vector for each layer:
``prompt_embeddings`` [n, num_layers · 2 · token_dim] with ``token_dim = head_dim ·
num_key_value_heads`` (GQA-aware, as peft) — or, with ``prefix_projection``, a smaller embedding
[n, token_dim] and an MLP ``Linear(token_dim, encoder_hidden_size) → tanh → Linear(…, num_layers ·
2 · token_dim)`` that produces it (peft saves only the MLP's output, so a loaded projected prefix is
the flat table).

A forward pre-hook (shared with prompt tuning, :mod:`lowbit.peft.prompt`) hands the prefix to the
model through transformers' cache API, exactly as peft's ``get_prompt`` does: the flat table is
viewed as [n, layers · 2, kv_heads, head_dim], layer ℓ's keys are row 2ℓ and its values row 2ℓ + 1
([B, kv_heads, n, head_dim] each), written into the call's cache (a new ``DynamicCache``, or the
empty cache passed in — a ``StaticCache`` gets them in its first n slots); the attention mask gets
n leading ones and ``position_ids`` move by n. A call whose cache already holds tokens is a decode
step and only gets the mask extended, so ``model.generate`` and lowbit's compiled
:class:`~lowbit.generate.Generator` (static cache n slots longer) work unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, UnsupportedModelError
from lowbit.peft.model import register_method
from lowbit.peft.prompt import (PromptEncoder, PromptLearningConfig, PromptLearningMethod, batch_size, cache_key,
                                check_shape, extend_mask, model_dims, resolve_common)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings, with Hugging Face peft's field names.

    Attributes:
        num_virtual_tokens: n, the number of key/value positions put before every sequence.
        prefix_projection: learn an embedding [n, token_dim] and a two-layer MLP producing the
            prefix, instead of the prefix table itself.
        encoder_hidden_size: the MLP's hidden width (None: token_dim).
        init_weights: None (random) or ``"zero"`` (zero prefix: the MLP's last layer, or the table).
        token_dim / num_attention_heads: filled from the model: ``head_dim · num_key_value_heads``
            and ``num_key_value_heads``.
    """

    peft_type = "PREFIX_TUNING"
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise InvalidSpecError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        if not isinstance(self.prefix_projection, bool):
            raise InvalidSpecError(f"PrefixTuningConfig.prefix_projection must be a bool, "
                                   f"got {self.prefix_projection!r}")
        hidden = self.encoder_hidden_size
        if hidden is not None and (not isinstance(hidden, int) or not 1 <= hidden <= MAX_ENCODER_HIDDEN):
            raise InvalidSpecError(f"PrefixTuningConfig.encoder_hidden_size must be an integer in [1, "
                                   f"{MAX_ENCODER_HIDDEN}] or None, got {hidden!r}")


MAX_ENCODER_HIDDEN = 1 << 17  # the prefix MLP's width: far above any model's hidden size


class PrefixEncoder(PromptEncoder):
    """The learned prefix (peft's PrefixEncoder, same module names and initialisation).

    ``embedding.weight``: [n, layers·2·token_dim] (table) or [n, token_dim] with ``transform`` (MLP).
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__(config)
        n, dim = int(config.num_virtual_tokens), int(config.token_dim)  # type: ignore[arg-type]
        layers = int(config.num_layers)  # type: ignore[arg-type]
        self.projected = config.prefix_projection and not config.inference_mode
        if self.projected:
            hidden = int(config.encoder_hidden_size or dim)
            self.embedding = nn.Embedding(n, dim)
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * dim))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, layers * 2 * dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def table(self) -> torch.Tensor:
        """The prefix [n, layers·2·token_dim] (through the MLP when projected)."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, kv_heads, n, head_dim] in ``dtype``."""
        config = self.config
        n, heads, layers = self.num_virtual_tokens, int(config.num_attention_heads), int(config.num_layers)
        kv = self.table().to(dtype).view(n, layers * 2, heads, int(config.token_dim) // heads)
        kv = kv.permute(1, 2, 0, 3)  # [layers·2, heads, n, head_dim]
        return [(kv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1), kv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1))
                for i in range(layers)]

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any], filled: bool) -> dict[str, Any]:
        n = self.num_virtual_tokens
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if kwargs.get("token_type_ids") is not None and self.config.task_type not in ("SEQ_CLS", "TOKEN_CLS",
                                                                                       "QUESTION_ANS"):
            kwargs["token_type_ids"] = None  # peft drops them here
        if filled:
            return kwargs
        key = cache_key(kwargs)
        cache = kwargs.get(key)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        for layer, (keys, values) in enumerate(self.key_values(batch_size(kwargs), model_dtype(model))):
            cache.update(keys, values, layer)
        kwargs[key] = cache
        return kwargs

    def peft_tensor(self) -> torch.Tensor:
        return self.table()

    def load_peft_tensor(self, tensor: torch.Tensor, where: str) -> None:
        """Load peft's flat prefix; a projected encoder becomes the table (the MLP is not in the file)."""
        config = self.config
        shape = (self.num_virtual_tokens, int(config.num_layers) * 2 * int(config.token_dim))  # type: ignore[arg-type]
        check_shape(where, tensor, shape)
        device = self.embedding.weight.device
        if self.projected:
            trainable = self.embedding.weight.requires_grad
            del self.transform
            self.embedding = nn.Embedding(*shape, device=device).requires_grad_(trainable)
            self.projected = False
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.to(self.embedding.weight))


def model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def accepts_cache(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters
    return "cache" in params or "past_key_values" in params


class _PrefixTuningMethod(PromptLearningMethod):
    def make(self, model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
        if not accepts_cache(model):
            raise UnsupportedModelError(f"{type(model).__name__}.forward takes no KV cache (cache / past_key_values); "
                                        "prefix tuning needs one (use the base model class, or prompt tuning)")
        if any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules()):
            raise UnsupportedModelError(f"{type(model).__name__}: prefix tuning does not work with gradient "
                                        "checkpointing (the prefix travels in the KV cache); turn it off first")
        data = model_dims(model)
        base = resolve_common(model, dataclasses.replace(config, token_dim=None, num_attention_heads=None))
        fixed: dict[str, int] = {}
        if data.get("num_key_value_heads") is not None:  # GQA: the prefix has the cache's width (peft #1901)
            head_dim = data.get("head_dim") or base["token_dim"] // base["num_attention_heads"]
            fixed = {"token_dim": int(head_dim) * int(data["num_key_value_heads"]),
                     "num_attention_heads": int(data["num_key_value_heads"])}
        resolved = resolve_common(model, config, **fixed)
        if config.encoder_hidden_size is None:
            resolved["encoder_hidden_size"] = resolved["token_dim"]
        encoder = PrefixEncoder(dataclasses.replace(config, **resolved))
        weight = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
        return encoder.to(weight.device) if weight is not None else encoder


register_method("PREFIX_TUNING", _PrefixTuningMethod())
