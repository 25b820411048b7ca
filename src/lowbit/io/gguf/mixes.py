"""llama.cpp's file types ("mixes"): which GGUF block type each tensor gets.

``q4_k_m`` is not one type: llama.cpp gives ``attn_v``/``ffn_down`` of some layers Q6_K, the output
head Q6_K, and the rest Q4_K. These rules are the ones of llama.cpp's ``llama_tensor_get_type``
(src/llama-quant.cpp) for dense, non-MoE models, written as data and small functions so a reader can
check them against it; per-tensor overrides (``--tensor-type PATTERN=TYPE``) come first, as there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import InvalidSpecError

# mix name → (base block type, llama.cpp LlamaFileType member name)
MIXES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q2_k": ("Q2_K", "MOSTLY_Q2_K"),
    "q3_k_s": ("Q3_K", "MOSTLY_Q3_K_S"),
    "q3_k_m": ("Q3_K", "MOSTLY_Q3_K_M"),
    "q3_k_l": ("Q3_K", "MOSTLY_Q3_K_L"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
}
MIX_ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "fp16": "f16", "float16": "f16"}
FLOAT_TYPES = ("F32", "F16", "BF16")
# a row that is not a multiple of the type's block size falls back (llama.cpp's tensor_type_fallback)
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
         "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}

# GGUF tensor name (without "blk.N." and ".weight") → llama.cpp tensor category
CATEGORIES = {"token_embd": "token_embd", "output": "output", "attn_q": "attn_q", "attn_k": "attn_k",
              "attn_v": "attn_v", "attn_qkv": "attn_qkv", "attn_output": "attn_output", "ffn_gate": "ffn_gate",
              "ffn_up": "ffn_up", "ffn_down": "ffn_down"}


def mix_names() -> list[str]:
    return list(MIXES)


def resolve_mix(name: str) -> str:
    """Canonical mix name for ``name`` (case-insensitive); unknown → InvalidSpecError listing the choices."""
    key = MIX_ALIASES.get(name.lower(), name.lower())
    if key not in MIXES:
        raise InvalidSpecError(f"unknown GGUF type {name!r}; choose one of {', '.join(MIXES)}")
    return key


def parse_tensor_types(items: list[str] | tuple[str, ...]) -> list[tuple[re.Pattern[str], str]]:
    """``["attn_v=q8_0", "ffn_down=q6_k"]`` → [(regex, "Q8_0"), …] (searched in GGUF tensor names, first wins)."""
    out = []
    for item in items:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern:
            raise InvalidSpecError(f"--tensor-type {item!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0")
        qtype = type_name.upper()
        if qtype not in BLOCK:
            raise InvalidSpecError(f"--tensor-type {item!r}: unknown block type {type_name!r}; "
                                   f"choose one of {', '.join(t.lower() for t in BLOCK)}")
        try:
            out.append((re.compile(pattern), qtype))
        except re.error as exc:
            raise InvalidSpecError(f"--tensor-type {item!r}: bad regular expression ({exc})") from None
    return out


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class TensorSlot:
    """Where a tensor sits: its GGUF name, category, layer index (or None) and row length."""

    name: str
    category: str
    layer: int | None
    n_layers: int
    row: int  # ne[0]: elements per row (the input dimension of a linear weight)


@dataclass(frozen=True)
class Choice:
    qtype: str
    reason: str  # "mix", "override", "fallback from Q4_K", "float" …


def choose_type(mix: str, slot: TensorSlot, *, tied: bool, n_gqa: int, arch: str = "llama",
                overrides: list[tuple[re.Pattern[str], str]] | None = None) -> Choice:
    """Block type for one 2-D weight under ``mix`` (llama.cpp's rules for dense models)."""
    base = MIXES[mix][0]
    if base in FLOAT_TYPES:
        return Choice(base, "mix")
    new, reason = base, "mix"
    manual = False
    for pattern, qtype in overrides or []:
        if pattern.search(slot.name):
            new, reason, manual = qtype, f"override {pattern.pattern}", True
            break
    if not manual:
        new = _mix_rule(mix, base, slot, tied=tied, n_gqa=n_gqa, arch=arch)
    if slot.row % BLOCK[new]:
        wanted = new
        new = FALLBACK.get(new, new)
        if slot.row % BLOCK[new]:
            new = "F16"
        reason = f"fallback from {wanted} (row of {slot.row} is not a multiple of {BLOCK[wanted]})"
    return Choice(new, reason)


def _mix_rule(mix: str, base: str, slot: TensorSlot, *, tied: bool, n_gqa: int, arch: str) -> str:
    cat, i, n = slot.category, slot.layer or 0, slot.n_layers
    falcon = arch == "falcon"
    if cat == "output" or (tied and cat == "token_embd"):
        if falcon or slot.row % BLOCK[base]:
            return "Q8_0"
        return "Q6_K" if base != "Q8_0" else base
    if cat == "token_embd":
        return base
    if cat == "attn_v":
        if mix == "q2_k":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if mix == "q3_k_m":
            return "Q5_K" if i < 2 else "Q4_K"
        if mix == "q3_k_l":
            return "Q5_K"
        if mix in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            return "Q6_K"
        if mix == "q4_k_s" and i < 4:
            return "Q5_K"
        return base
    if cat == "ffn_down":
        if mix == "q2_k":
            return "Q3_K"
        if mix == "q3_k_m":
            if i < n // 16:
                return "Q5_K"
            return "Q4_K" if (not falcon or _more_bits(i, n)) else "Q3_K"
        if mix == "q3_k_l":
            return "Q4_K" if falcon else "Q5_K"
        if mix == "q4_k_m":
            if falcon:
                return "Q6_K" if i < n // 16 else ("Q5_K" if _more_bits(i, n) else "Q4_K")
            return "Q6_K" if _more_bits(i, n) else base
        if mix == "q5_k_m" and _more_bits(i, n):
            return "Q6_K"
        if mix == "q4_k_s" and not falcon and i < n // 8:
            return "Q5_K"
        return base
    if cat == "attn_output":
        if falcon:
            return "Q4_K" if mix == "q3_k_l" else base
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(mix, base)
    if cat == "attn_qkv":
        return {"q3_k_m": "Q4_K", "q3_k_l": "Q4_K", "q4_k_m": "Q5_K", "q5_k_m": "Q6_K"}.get(mix, base)
    return base
