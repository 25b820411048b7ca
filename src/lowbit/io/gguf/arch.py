"""Architectures the GGUF writer supports: tensor-name tables and hyper-parameter metadata, as data.

A Hugging Face Llama-family checkpoint maps onto llama.cpp's graph by renaming tensors (tables
below), permuting the rows of Q/K for llama.cpp's interleaved RoPE (``llama`` only — Qwen2/3 use
NeoX RoPE in both), and writing the hyper-parameters under ``{arch}.*`` keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.errors import ExportError, GGUFError, UnsupportedModelError


@dataclass(frozen=True)
class ArchTable:
    """How one Hugging Face architecture maps to a llama.cpp architecture."""

    gguf_arch: str
    hf_architecture: str
    model_type: str
    permute_qk: bool  # llama.cpp's "llama" graph uses interleaved RoPE: HF q/k rows are permuted
    extra_blocks: dict[str, str] = field(default_factory=dict)


GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_TENSORS = {  # under model.layers.{i}. → blk.{i}.
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

ARCHS: dict[str, ArchTable] = {
    "LlamaForCausalLM": ArchTable("llama", "LlamaForCausalLM", "llama", True),
    "MistralForCausalLM": ArchTable("llama", "MistralForCausalLM", "mistral", True),
    "Qwen2ForCausalLM": ArchTable("qwen2", "Qwen2ForCausalLM", "qwen2", False),
    "Qwen3ForCausalLM": ArchTable("qwen3", "Qwen3ForCausalLM", "qwen3", False),
}
# reading a GGUF back: llama.cpp architecture → the Hugging Face class we build
IMPORT_ARCHS = {"llama": ARCHS["LlamaForCausalLM"], "qwen2": ARCHS["Qwen2ForCausalLM"],
                "qwen3": ARCHS["Qwen3ForCausalLM"]}
_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def arch_for(config: dict[str, Any], where: str) -> ArchTable:
    """The table for a model's config.json; unsupported architectures get an error listing the supported ones."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    raise UnsupportedModelError(
        f"{where}: GGUF export supports {', '.join(ARCHS)}; this model is {', '.join(names) or config.get('model_type')}")


def gguf_name(hf_name: str) -> str | None:
    """GGUF tensor name for a Hugging Face parameter name (None: not part of the llama.cpp graph)."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    m = _BLOCK_RE.match(hf_name)
    if m and m.group(2) in BLOCK_TENSORS:
        return f"blk.{m.group(1)}.{BLOCK_TENSORS[m.group(2)]}"
    return None


def hf_name(gguf_tensor: str) -> str | None:
    """Inverse of :func:`gguf_name`."""
    for hf, gg in GLOBAL_TENSORS.items():
        if gg == gguf_tensor:
            return hf
    m = _GGUF_BLOCK_RE.match(gguf_tensor)
    if m:
        for hf, gg in BLOCK_TENSORS.items():
            if gg == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}"
    return None


def category_of(gguf_tensor: str) -> tuple[str, int | None]:
    """(category, layer) of a GGUF tensor name, e.g. ``blk.3.attn_v.weight`` → (``attn_v``, 3)."""
    m = _GGUF_BLOCK_RE.match(gguf_tensor)
    if m:
        return m.group(2).rsplit(".", 1)[0], int(m.group(1))
    return gguf_tensor.rsplit(".", 1)[0], None


def head_dims(config: dict[str, Any]) -> tuple[int, int, int]:
    """(n_head, n_head_kv, head_dim)."""
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    return n_head, n_kv, head_dim


def qk_row_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's interleaved RoPE expects: ``new[j] = old[perm[j]]`` for a q/k weight of ``rows``.

    Per head, HF stores the two rotary halves one after the other; llama.cpp interleaves them
    (what convert_hf_to_gguf.py's ``permute`` does with reshape/swapaxes). A pure row permutation,
    so quantized rows move as whole rows and code-mapped weights are permuted without re-rounding.
    """
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    return params


def write_hparams(writer: Any, table: ArchTable, config: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Write ``{arch}.*`` hyper-parameters; return extra tensors the graph needs (llama3 ``rope_freqs``)."""
    import gguf

    n_head, n_kv, head_dim = head_dims(config)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    extra: list[tuple[str, torch.Tensor]] = []
    rope_type = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        attn = rope.get("attention_factor", rope.get("attn_factor"))
        if attn is not None:
            writer.add_rope_scaling_yarn_attn_factor(float(attn))
    elif rope_type == "llama3":
        extra.append(("rope_freqs.weight", llama3_rope_factors(rope, head_dim)))
    elif rope_type not in ("default", "none"):
        raise ExportError(f"config.json: rope_type {rope_type!r} is not supported by the GGUF writer "
                          "(supported: default, linear, yarn, llama3)")
    if config.get("sliding_window") and config.get("use_sliding_window", table.model_type == "mistral"):
        # llama.cpp's llama/qwen2 graphs attend to the full context; fine while prompts fit the window
        pass
    return extra


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama-3's rope scaling (llama.cpp reads them as ``rope_freqs``)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(wavelen),
                      torch.where(wavelen > old_ctx / low, torch.full_like(wavelen, factor), mid))
    return out.float()


def config_from_gguf(meta: dict[str, Any], path: str) -> tuple[ArchTable, dict[str, Any]]:
    """A Hugging Face config.json dict from a GGUF file's metadata (import); bad values → GGUFError naming the key."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in IMPORT_ARCHS:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} cannot be imported; "
                                    f"supported: {', '.join(IMPORT_ARCHS)}")
    table = IMPORT_ARCHS[arch]

    def integer(key: str, default: int | None = None, lo: int = 1, hi: int = 1 << 20) -> int:
        full = f"{arch}.{key}"
        value = meta.get(full, default)
        if value is None:
            raise GGUFError(f"{path}: metadata key {full} is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError(f"{path}: metadata key {full} should be an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise GGUFError(f"{path}: metadata key {full} = {value} is out of range [{lo}, {hi}]")
        return value

    def real(key: str, default: float, lo: float, hi: float) -> float:
        full = f"{arch}.{key}"
        value = meta.get(full, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
            raise GGUFError(f"{path}: metadata key {full} = {value!r} should be a number in [{lo}, {hi}]")
        return float(value)

    n_head = integer("attention.head_count")
    hidden = integer("embedding_length")
    head_dim = integer("attention.key_length", default=meta.get(f"{arch}.rope.dimension_count")
                       if isinstance(meta.get(f"{arch}.rope.dimension_count"), int) else hidden // n_head or 1)
    config: dict[str, Any] = {
        "architectures": [table.hf_architecture],
        "model_type": table.model_type,
        "hidden_size": hidden,
        "intermediate_size": integer("feed_forward_length"),
        "num_hidden_layers": integer("block_count", hi=4096),
        "num_attention_heads": n_head,
        "num_key_value_heads": integer("attention.head_count_kv", default=n_head),
        "head_dim": head_dim,
        "max_position_embeddings": integer("context_length", default=2048, hi=1 << 24),
        "rms_norm_eps": real("attention.layer_norm_rms_epsilon", 1e-6, 0.0, 1.0),
        "rope_theta": real("rope.freq_base", 10000.0, 1e-3, 1e12),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if n_head % config["num_key_value_heads"]:
        raise GGUFError(f"{path}: {arch}.attention.head_count {n_head} is not a multiple of head_count_kv "
                        f"{config['num_key_value_heads']}")
    if head_dim % 2:
        raise GGUFError(f"{path}: head dimension {head_dim} is odd; RoPE needs an even one")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope: dict[str, Any] = {"rope_type": scaling, "factor": real("rope.scaling.factor", 1.0, 1e-3, 1e6)}
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = integer("rope.scaling.original_context_length",
                                                               default=config["max_position_embeddings"], hi=1 << 24)
        config["rope_scaling"] = rope
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"{path}: {arch}.rope.scaling.type {scaling!r} cannot be imported (linear, yarn)")
    return table, config
