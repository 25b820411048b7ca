"""Rebuild a Hugging Face ``tokenizer.json`` from a GGUF file's ``tokenizer.ggml.*`` metadata (import).

``gpt2`` vocabularies (byte-level BPE) become a ``tokenizers`` BPE with the pre-tokenizer regexes of
the file's ``tokenizer.ggml.pre``; ``llama`` (SentencePiece) vocabularies become a byte-fallback BPE
whose merges are ordered by the pieces' scores, as SentencePiece merges them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import GGUFError, UnsupportedModelError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def write_tokenizer(meta: dict[str, Any], out: Path, where: str) -> str:
    """Write tokenizer.json + tokenizer_config.json into ``out``; return the GGUF tokenizer model name."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise GGUFError(f"{where}: no tokenizer in the file (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    tokens = [str(t) for t in tokens]
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, where)
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types, where)
    else:
        raise UnsupportedModelError(f"{where}: tokenizer model {model!r} cannot be imported yet (supported: gpt2, llama)")
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    bos = _token(meta, tokens, "bos")
    eos = _token(meta, tokens, "eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        from tokenizers.processors import TemplateProcessing

        single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
        pair = single + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
        specials = [(t, tokens.index(t)) for t in {bos if add_bos else None, eos if add_eos else None} if t]
        tok.post_processor = TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "model_max_length": 1 << 20}
    for key in ("bos", "eos", "unknown", "padding"):
        text = _token(meta, tokens, key)
        if text is not None:
            cfg[{"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")] = text
    if isinstance(meta.get("tokenizer.chat_template"), str):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return str(model)


def _token(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}_token_id")
    if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(tokens):
        return tokens[idx]
    return None


def _merges(meta: dict[str, Any], where: str) -> list[tuple[str, str]]:
    out = []
    for i, merge in enumerate(meta.get("tokenizer.ggml.merges") or []):
        parts = str(merge).split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{where}: tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'")
        out.append((parts[0], parts[1]))
    return out


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], where: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from lowbit.io.gguf.tokenizer_pre import regexes_for_pre

    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=_merges(meta, where), ignore_merges=False)
    tok = Tokenizer(bpe)
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    patterns = regexes_for_pre(pre)
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], where: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = list(meta.get("tokenizer.ggml.scores") or [])
    if len(scores) != len(tokens):
        raise GGUFError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta, where)
    if not merges:  # SentencePiece BPE: a piece is built from its best-scoring split, pieces merged by score
        candidates = []
        for piece, idx in vocab.items():
            if types[idx] != TOKEN_NORMAL or len(piece) < 2:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    candidates.append((-float(scores[idx]), idx, left, right))
        merges = [(left, right) for _, _, left, right in sorted(candidates)]
    unk = _token(meta, tokens, "unknown")
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
