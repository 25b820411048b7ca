"""Prompt tuning (peft's PROMPT_TUNING), and the machinery every prompt-learning method shares.

Prompt tuning learns ``num_virtual_tokens`` input embeddings (``prompt_embeddings`` [n, hidden])
that are put in front of every sequence. The model keeps its own class: the trained rows live in a
submodule of the model (``model.lowbit_prompt_learning``, a :class:`PromptBank`), so ``.to()``,
``parameters()`` and optimizers see them, and a forward pre-hook on the top model rewrites an
ordinary ``model(input_ids=…, attention_mask=…, labels=…)`` call exactly as peft's
``PeftModelFor…`` classes do:

- ``input_ids`` [B, T] → ``inputs_embeds`` [B, n + T, hidden] (the prompt rows first),
- ``attention_mask`` [B, T] → [B, n + T] (ones for the virtual tokens),
- ``labels`` [B, T] → [B, n + T] with -100 for the virtual tokens (CAUSAL_LM only),
- ``position_ids`` dropped (the model counts from 0 over the virtual tokens, as in peft),
- ``token_type_ids``: zeros prepended (SEQ_CLS / TOKEN_CLS / QUESTION_ANS) or dropped (others).

The outputs therefore cover ``n + T`` positions, as peft's do. A call with a non-empty KV cache is
a decode step (the virtual tokens are already in the cache): only the attention mask is extended.
That is what makes transformers' ``model.generate`` and lowbit's :class:`~lowbit.generate.Generator`
work unchanged (the static cache must hold ``n`` more tokens: see :func:`virtual_tokens`).

Prefix tuning (:mod:`lowbit.peft.prefix`) plugs into the same bank and hook.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import InvalidSpecError, LowbitError, ModelNotFoundError, ShapeError, UnsupportedModelError
from lowbit.peft.config import AdapterConfig
from lowbit.peft.model import peft_state, register_method

INIT_TYPES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
BANK_ATTR = "lowbit_prompt_learning"
STATE_KEY = "prompt_embeddings"  # peft's one tensor key for every prompt-learning method
TOKEN_TYPE_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")  # peft keeps token_type_ids (zeros prepended)


# ---- configs -------------------------------------------------------------------------------
@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields every prompt-learning method shares (peft's names).

    The model-derived fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
    ``num_transformer_submodules``) may stay None: they are read from the model when the adapter is
    applied and written to the saved ``adapter_config.json``; set ones are checked against the model.
    ``inference_mode`` (peft's flag; saved files carry True) skips initialisation that only matters
    for training (TEXT / SAMPLE_VOCAB rows, the prefix MLP): the tensors come from the file.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: Any = None
    inference_mode: bool = False

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidSpecError(f"{owner}.num_virtual_tokens must be an integer ≥ 1, got {n!r}")
        for key in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidSpecError(f"{owner}.{key} must be a positive integer or None, got {value!r}")
        if self.num_transformer_submodules not in (None, 1) or self.task_type == "SEQ_2_SEQ_LM":
            raise UnsupportedModelError(f"{owner}: encoder-decoder models (num_transformer_submodules="
                                        f"{self.num_transformer_submodules!r}, task_type={self.task_type!r}) are "
                                        "not supported; lowbit's prompt learning covers decoder-only and encoder "
                                        "models")
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        data["inference_mode"] = True  # as peft saves it: the file holds the trained tensors
        return data


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning settings, with Hugging Face peft's field names.

    Attributes:
        num_virtual_tokens: n, the number of learned input embeddings put before every sequence.
        prompt_tuning_init: how the rows [n, hidden] start: ``"RANDOM"`` (N(0, 1), as peft),
            ``"SAMPLE_VOCAB"`` (the input embeddings of n random token ids) or ``"TEXT"`` (the
            embeddings of ``prompt_tuning_init_text``'s tokens, repeated / truncated to n).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: the tokenizer for ``"TEXT"`` (``AutoTokenizer.from_pretrained``,
            with ``tokenizer_kwargs``; ``trust_remote_code`` is always dropped, as in peft).
        tokenizer: a tokenizer object to use instead (lowbit only; never written to JSON; its
            ``name_or_path`` fills ``tokenizer_name_or_path`` in the saved file when that is unset).
    """

    peft_type = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # peft's str enum
        if init not in INIT_TYPES:
            raise InvalidSpecError(f"PromptTuningConfig.prompt_tuning_init must be one of {', '.join(INIT_TYPES)}; "
                                   f"got {self.prompt_tuning_init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            if not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text:
                raise InvalidSpecError("PromptTuningConfig.prompt_tuning_init_text must be a non-empty string when "
                                       "prompt_tuning_init='TEXT'")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise InvalidSpecError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path "
                                       "or a tokenizer object (tokenizer=...)")
        elif self.tokenizer_kwargs:
            raise InvalidSpecError("PromptTuningConfig.tokenizer_kwargs is only valid with prompt_tuning_init='TEXT'")
        if self.tokenizer is not None and not callable(self.tokenizer):
            raise InvalidSpecError(f"PromptTuningConfig.tokenizer must be a tokenizer object, got "
                                   f"{type(self.tokenizer).__name__}")

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        tokenizer = data.pop("tokenizer", None)
        if data["prompt_tuning_init"] == "TEXT" and not data.get("tokenizer_name_or_path"):
            name = getattr(tokenizer, "name_or_path", None)
            if name:
                data["tokenizer_name_or_path"] = str(name)
            else:  # peft refuses TEXT without a tokenizer name; the saved rows make the init moot anyway
                data.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_kwargs=None)
        return data


# ---- model dimensions ----------------------------------------------------------------------
def model_dims(model: nn.Module) -> dict[str, Any]:
    """The model's text config as a dict (``hidden_size``, ``num_hidden_layers`` …; peft's lookups)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__}: prompt learning needs a transformers model (no .config)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    data = text.to_dict() if hasattr(text, "to_dict") else dict(vars(text))
    if "num_hidden_layers" not in data and hasattr(text, "num_hidden_layers"):
        data["num_hidden_layers"] = text.num_hidden_layers
    return data


def first_key(data: dict[str, Any], keys: tuple[str, ...], what: str, owner: str) -> int:
    for key in keys:
        if data.get(key) is not None:
            return int(data[key])
    raise UnsupportedModelError(f"{owner}: cannot read the model's {what} (none of {', '.join(keys)} in its "
                                f"config); set {owner}.{what} yourself")


MAX_VIRTUAL_TOKENS = 1 << 16  # for models that state no maximum number of positions


def resolve_common(model: nn.Module, config: PromptLearningConfig, **fixed: int) -> dict[str, int]:
    """peft's ``_prepare_prompt_learning_config`` for the shared fields; ``fixed`` overrides (GQA …).
    Returns the resolved values; a value set in ``config`` that disagrees is a :class:`ShapeError`."""
    owner = type(config).__name__
    data = model_dims(model)
    want = {
        "num_layers": first_key(data, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers", owner),
        "token_dim": first_key(data, ("hidden_size", "n_embd", "d_model"), "token_dim", owner),
        "num_attention_heads": first_key(data, ("num_attention_heads", "n_head", "num_heads",
                                                "encoder_attention_heads"), "num_attention_heads", owner),
        "num_transformer_submodules": 1,
    }
    want.update(fixed)
    for key, value in want.items():
        given = getattr(config, key)
        if given is not None and given != value:
            raise ShapeError(f"{owner}.{key} is {given}, but this model needs {value}")
    positions = next((int(data[k]) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                      if isinstance(data.get(k), int)), MAX_VIRTUAL_TOKENS)
    if config.num_virtual_tokens >= min(positions, MAX_VIRTUAL_TOKENS):  # checked before anything is allocated
        raise ShapeError(f"{owner}.num_virtual_tokens is {config.num_virtual_tokens}: the virtual tokens must leave "
                         f"room in the model's {min(positions, MAX_VIRTUAL_TOKENS)} positions")
    return want


# ---- the bank of prompt-learning encoders and the forward pre-hook -------------------------
class PromptEncoder(nn.Module, metaclass=abc.ABCMeta):
    """Base of a prompt-learning encoder held in the :class:`PromptBank` (one per adapter name).

    ``config`` is the adapter's config with the model-derived fields resolved.
    """

    def __init__(self, config: PromptLearningConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config.num_virtual_tokens)

    @abc.abstractmethod
    def rewrite(self, model: nn.Module, kwargs: dict[str, Any], filled: bool) -> dict[str, Any]:
        """The forward's keyword arguments with the virtual tokens added (``filled``: the cache has them)."""

    @abc.abstractmethod
    def peft_tensor(self) -> torch.Tensor:
        """peft's ``prompt_embeddings`` tensor."""

    @abc.abstractmethod
    def load_peft_tensor(self, tensor: torch.Tensor, where: str) -> None:
        """Copy peft's ``prompt_embeddings`` into this encoder (shapes checked, ``where`` names the file)."""


class PromptBank(nn.Module):
    """The model's prompt-learning adapters: ``encoders`` by adapter name, which one is on, the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.enabled: list[str] = []
        self.suspended: set[str] = set()  # names switched off by disable_adapters (their grads untouched)
        self.hook: Any = None
        self.arg_names: list[str] | None = None

    def active(self) -> PromptEncoder | None:
        names = [n for n in self.enabled if n in self.encoders]
        if len(names) > 1:
            raise LowbitError(f"prompt-learning adapters {names} are active together; peft runs one at a time "
                              "(set_adapter(model, one_name))")
        return self.encoders[names[0]] if names else None  # type: ignore[return-value]


def get_bank(model: nn.Module, create: bool = False) -> PromptBank | None:
    bank = getattr(model, BANK_ATTR, None)
    if bank is None and create:
        bank = PromptBank()
        setattr(model, BANK_ATTR, bank)
        bank.hook = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return bank


def virtual_tokens(model: nn.Module) -> int:
    """How many positions the active prompt-learning adapter adds in front of each sequence (0: none).

    A static KV cache (lowbit's :class:`~lowbit.generate.Generator`) needs this many more slots."""
    bank = get_bank(model)
    encoder = bank.active() if bank is not None else None
    return 0 if encoder is None else encoder.num_virtual_tokens


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    bank = get_bank(model)
    encoder = bank.active() if bank is not None else None
    if encoder is None:
        return None
    if args:
        kwargs = _bind_positional(model, bank, args, kwargs)
    return (), encoder.rewrite(model, dict(kwargs), cache_filled(cache_of(kwargs)))


def _bind_positional(model: nn.Module, bank: PromptBank, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if bank.arg_names is None:
        params = inspect.signature(model.forward).parameters.values()
        bank.arg_names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(bank.arg_names):
        raise LowbitError(f"{type(model).__name__}.forward: too many positional arguments for prompt learning")
    return {**dict(zip(bank.arg_names, args)), **kwargs}


def cache_key(kwargs: dict[str, Any]) -> str:
    """The name the KV cache travels under: ``cache`` (transformers ≥ 5.x) or ``past_key_values``."""
    if kwargs.get("past_key_values") is not None and kwargs.get("cache") is None:
        return "past_key_values"
    return "cache"


def cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get(cache_key(kwargs))


def cache_filled(cache: Any) -> bool:
    """Whether the KV cache already holds tokens (then the virtual tokens are in it: a decode step).

    Inside ``torch.compile`` a compileable (static) cache counts as filled without reading its
    length (a data-dependent value): compiled calls are decode steps, prefill runs eagerly."""
    if cache is None:
        return False
    if isinstance(cache, (tuple, list)):
        return len(cache) > 0 and cache[0] is not None and cache[0][0].shape[-2] > 0
    if torch.compiler.is_compiling() and getattr(cache, "is_compileable", False):
        return True
    return int(cache.get_seq_length()) > 0


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return int(kwargs[key].shape[0])
    raise LowbitError("prompt learning needs input_ids or inputs_embeds in the forward call")


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``attention_mask`` [B, T] → [B, n + T] with ones in front (peft's prefix attention mask)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise UnsupportedModelError(f"prompt learning extends 2-D attention masks [batch, seq]; got a "
                                    f"{mask.dim()}-D mask (pass the 2-D padding mask instead)")
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


# ---- prompt tuning -------------------------------------------------------------------------
class PromptEmbedding(PromptEncoder):
    """The learned prompt: ``embedding.weight`` [n, token_dim] float32 (peft's PromptEmbedding)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config)
        n, dim = int(config.num_virtual_tokens), int(config.token_dim)  # type: ignore[arg-type]
        weight = word_embeddings.weight
        self.embedding = nn.Embedding(n, dim, device=weight.device)  # N(0, 1), as peft's RANDOM
        ids = None
        if not config.inference_mode and config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, weight.shape[0], (n,), dtype=torch.long).to(weight.device)
        elif not config.inference_mode and config.prompt_tuning_init == "TEXT":
            ids = text_token_ids(config, n).to(weight.device)
        if ids is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings(ids).detach().float())

    def prompts(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """[batch, n, token_dim] in ``dtype``."""
        return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1).to(dtype)

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any], filled: bool) -> dict[str, Any]:
        n = self.num_virtual_tokens
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        kwargs.pop("position_ids", None)  # peft ignores them for prompt tuning
        token_types = kwargs.pop("token_type_ids", None)
        if filled:
            return kwargs
        batch = batch_size(kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        kwargs["inputs_embeds"] = torch.cat([self.prompts(batch, embeds.dtype), embeds], dim=1)
        if token_types is not None and self.config.task_type in TOKEN_TYPE_TASKS:
            zeros = torch.zeros(batch, n, dtype=token_types.dtype, device=token_types.device)
            kwargs["token_type_ids"] = torch.cat([zeros, token_types], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and self.config.task_type == "CAUSAL_LM":
            pad = torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat([pad, labels], dim=1)
        return kwargs

    def peft_tensor(self) -> torch.Tensor:
        return self.embedding.weight

    def load_peft_tensor(self, tensor: torch.Tensor, where: str) -> None:
        check_shape(where, tensor, self.embedding.weight.shape)
        with torch.no_grad():
            self.embedding.weight.copy_(tensor.to(self.embedding.weight))


def text_token_ids(config: PromptTuningConfig, n: int) -> torch.Tensor:
    """The init text's token ids, repeated / truncated to ``n`` (peft's TEXT init) [n] int64."""
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # a saved adapter must not run code
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"PromptTuningConfig.tokenizer_name_or_path={config.tokenizer_name_or_path!r}: "
                                     f"cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise InvalidSpecError("PromptTuningConfig.prompt_tuning_init_text encodes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return torch.tensor(ids, dtype=torch.long)


def check_shape(where: str, tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeError(f"{where}: {STATE_KEY} has shape {tuple(tensor.shape)}, this adapter needs {tuple(shape)}")


# ---- the method (shared by prompt and prefix tuning) ----------------------------------------
class PromptLearningMethod(abc.ABC):
    """inject / state / load / remove / set_enabled for one prompt-learning method; subclasses
    build the encoder (``make``)."""

    @abc.abstractmethod
    def make(self, model: nn.Module, config: Any) -> PromptEncoder:
        """Built by each subclass."""

    def inject(self, model: nn.Module, config: Any, name: str) -> list[str]:
        encoder = self.make(model, config)
        bank = get_bank(model, create=True)
        bank.encoders[name] = encoder  # type: ignore[union-attr]
        return []  # no layer is wrapped

    def encoder(self, model: nn.Module, name: str) -> PromptEncoder:
        bank = get_bank(model)
        if bank is None or name not in bank.encoders:
            raise LowbitError(f"adapter {name!r} has no prompt encoder on this model")
        return bank.encoders[name]  # type: ignore[return-value]

    def state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return {STATE_KEY: self.encoder(model, name).peft_tensor().detach().float()}

    def load(self, model: nn.Module, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        extra = sorted(set(state) - {STATE_KEY})
        if extra:
            raise LowbitError(f"{where}: tensor(s) {extra[:5]} do not belong to a prompt-learning adapter "
                              f"(expected only {STATE_KEY!r})")
        if STATE_KEY not in state:
            raise LowbitError(f"{where}: no {STATE_KEY!r} tensor")
        self.encoder(model, name).load_peft_tensor(state[STATE_KEY], where)

    def remove(self, model: nn.Module, name: str) -> None:
        bank = get_bank(model)
        if bank is None:
            return
        if name in bank.encoders:
            del bank.encoders[name]
        bank.enabled = [n for n in bank.enabled if n != name]
        bank.suspended.discard(name)
        if not len(bank.encoders):
            if bank.hook is not None:
                bank.hook.remove()
            delattr(model, BANK_ATTR)

    def set_enabled(self, model: nn.Module, name: str, enabled: bool) -> None:
        bank = get_bank(model)
        if bank is None or name not in bank.encoders:
            return
        bank.enabled = [n for n in bank.enabled if n != name] + ([name] if enabled else [])
        if peft_state(model).disabled:  # disable_adapters: switched off for a while, grads untouched
            bank.suspended.add(name)
        elif name in bank.suspended:  # disable_adapters ended
            bank.suspended.discard(name)
        else:  # set_adapter: like layer adapters, only the active ones train
            bank.encoders[name].requires_grad_(enabled)

    def saved_config(self, model: nn.Module, name: str, data: dict[str, Any]) -> dict[str, Any]:
        """The resolved model-derived fields (token_dim, num_layers …) go into the saved file."""
        resolved = self.encoder(model, name).config.to_peft_dict()
        data.update({k: v for k, v in resolved.items() if k not in ("peft_version", "base_model_name_or_path")})
        return data


class _PromptTuningMethod(PromptLearningMethod):
    def make(self, model: nn.Module, config: PromptTuningConfig) -> PromptEmbedding:
        words = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if words is None or getattr(words, "weight", None) is None:
            raise UnsupportedModelError(f"{type(model).__name__}: prompt tuning needs the model's input embeddings "
                                        "(get_input_embeddings())")
        hidden = int(words.weight.shape[1])
        resolved = resolve_common(model, config, token_dim=hidden)
        return PromptEmbedding(dataclasses.replace(config, **resolved), words)


register_method("PROMPT_TUNING", _PromptTuningMethod())
