"""Check a model's config.json values before anything is built from them.

transformers trusts its config: a negative ``hidden_size``, a list where an integer belongs or a 2^40 dimension
end in a RuntimeError/TypeError deep inside a model constructor (or an attempted petabyte allocation for a
rotary table). Here every size field a decoder or encoder config commonly carries is checked for type and a
sane range, and the head arithmetic for consistency, so that a hand-edited or corrupt config gets one
:class:`~lowbit.errors.CorruptFileError` naming the file and the field.
"""

from __future__ import annotations

import math
from typing import Any

from lowbit.errors import CorruptFileError

# field → (smallest, largest) allowed value; the ceilings are far above any released model (a 2^17 hidden size,
# 4 M-token vocabularies, 16 M positions) and far below what would exhaust memory while building the model.
SIZE_FIELDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 1 << 17), "n_embd": (1, 1 << 17), "d_model": (1, 1 << 17), "dim": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20), "n_inner": (1, 1 << 20), "ffn_dim": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 4096), "n_layer": (1, 4096), "num_layers": (1, 4096),
    "num_attention_heads": (1, 4096), "n_head": (1, 4096), "num_key_value_heads": (1, 4096),
    "head_dim": (1, 1 << 14), "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 24), "n_positions": (1, 1 << 24), "n_ctx": (1, 1 << 24),
    "num_local_experts": (1, 1 << 12), "num_experts": (1, 1 << 12), "num_experts_per_tok": (1, 1 << 12),
    "type_vocab_size": (0, 1 << 16), "sliding_window": (1, 1 << 24),
}
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "initializer_range")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# flags the model's forward branches on (a NaN or a string there passes construction and fails mid-forward)
BOOL_FIELDS = ("output_hidden_states", "output_attentions", "use_cache", "return_dict", "tie_word_embeddings",
               "is_encoder_decoder", "attention_bias", "mlp_bias")
NESTED = ("text_config",)  # multimodal configs keep the language model's fields here


def check_config(config: dict[str, Any], where: str = "config.json") -> None:
    """Raise CorruptFileError naming ``where`` and the field for a value no model can be built from."""
    if not isinstance(config, dict):
        raise CorruptFileError(f"{where}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise CorruptFileError(f"{where}: model_type must be a string, got {type(model_type).__name__}")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CorruptFileError(f"{where}: architectures must be a list of class names")
    _check_values(config, where, "")
    for key in NESTED:
        if isinstance(config.get(key), dict):
            _check_values(config[key], where, f"{key}.")


def _check_values(config: dict[str, Any], where: str, prefix: str) -> None:
    for name, (low, high) in SIZE_FIELDS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            if name == "sliding_window" and value is False:
                continue
            raise CorruptFileError(f"{where}: {prefix}{name} must be an integer, got {_show(value)}")
        if not low <= value <= high:
            raise CorruptFileError(f"{where}: {prefix}{name} = {value} is outside [{low}, {high}]")
    for name in POSITIVE_FLOATS:
        value = config.get(name)
        if value is None:
            continue
        if not _finite(value) or value < 0:
            raise CorruptFileError(f"{where}: {prefix}{name} must be a finite number ≥ 0, got {_show(value)}")
    for name in BOOL_FIELDS:
        value = config.get(name)
        if value is not None and not isinstance(value, bool):
            raise CorruptFileError(f"{where}: {prefix}{name} must be true or false, got {_show(value)}")
    vocab = config.get("vocab_size")
    for name in TOKEN_IDS:
        value = config.get(name)
        ids = value if isinstance(value, list) else [value]
        for token in ids:
            if token is None:
                continue
            if isinstance(token, bool) or not isinstance(token, int) or token < -1 or (
                    isinstance(vocab, int) and token >= max(vocab, 1) + 1024):
                raise CorruptFileError(f"{where}: {prefix}{name} {_show(value)} is not a token id of the vocabulary")
    heads = config.get("num_attention_heads", config.get("n_head"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    kv = config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise CorruptFileError(f"{where}: {prefix}num_attention_heads {heads} is not a multiple of "
                               f"num_key_value_heads {kv}")
    if isinstance(heads, int) and isinstance(hidden, int) and config.get("head_dim") is None and hidden % heads:
        raise CorruptFileError(f"{where}: {prefix}hidden_size {hidden} is not a multiple of num_attention_heads "
                               f"{heads} (and no head_dim is given)")


def _finite(value: Any) -> bool:
    """A real number (no bool) within the float range (an integer of 400 digits is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
