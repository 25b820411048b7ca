"""Tokenizer metadata for GGUF (llama.cpp's ``tokenizer.ggml.*`` keys), read from Hugging Face ``tokenizer.json``.

llama.cpp's own converter identifies a BPE pre-tokenizer by hashing the token ids of a probe text and looking
the hash up in a registry; an unknown hash is refused ("BPE pre-tokenizer was not recognized"). Here the
tokenizer's own ``pre_tokenizer`` config is read instead: its split regexes are compared with the regex sets
llama.cpp's ``src/llama-vocab.cpp`` runs for each ``tokenizer.ggml.pre`` value (:data:`_PRE_REGEXES`), and the
name whose regexes (and merge flags) are equal is written. A tokenizer llama.cpp cannot reproduce is refused
with an :class:`~lowbit.errors.ExportError` that names what differs, never written approximately in silence.

Four Hugging Face models map to four llama.cpp tokenizers:

===========================================  ====================  ==========================================
tokenizer.json                               tokenizer.ggml.model  written
===========================================  ====================  ==========================================
BPE + ByteLevel (GPT-2, Llama-3, Qwen2)      ``gpt2``              tokens, token types, merges, ``pre``
BPE + ``▁`` spaces + byte_fallback (Llama-2)  ``llama`` (SPM)       tokens, scores from merge ranks, types
Unigram (T5, SentencePiece unigram)          ``t5`` (UGM)          tokens, scores, types, charsmap, ws flags
WordPiece (BERT)                             ``bert`` (WPM)        ``▁``-prefixed tokens, types, lowercase
===========================================  ====================  ==========================================

plus the special token ids, ``add_bos_token``/``add_eos_token`` and the chat template. What the file cannot
express exactly but only matters in narrow cases (an added token's ``lstrip``, a regex llama.cpp evaluates
with Unicode sub-categories collapsed, float32 scores) is listed in :attr:`TokenizerReport.warnings`.
"""

from __future__ import annotations

import base64
import difflib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from lowbit.errors import CorruptFileError, ExportError
from lowbit.io.gguf.tokenizer_pre import (
    _ALIASES_APPROX, _ALIASES_EXACT, _CUSTOM_SPLITTERS, _HF_BYTELEVEL, _PRE_NAMES, _PRE_REGEXES,
)

__all__ = ["TokenizerReport", "add_tokenizer", "tokenizer_metadata"]

# llama.cpp token types (gguf.TokenType; llama.h LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_K = "tokenizer.ggml."
SPIECE = "\u2581"  # ▁, SentencePiece's escaped space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

@dataclass(frozen=True)
class TokenizerReport:
    """What :func:`add_tokenizer` wrote, for the CLI's ``--json``.

    ``model`` is ``tokenizer.ggml.model`` (gpt2 / llama / t5 / bert), ``pre`` the pre-tokenizer name (BPE only),
    ``special`` maps bos/eos/unk/pad/sep/cls/mask to token ids, ``warnings`` lists the narrow cases where
    llama.cpp can tokenize differently from Hugging Face (empty when it cannot).
    """

    model: str
    pre: str | None
    vocab_size: int
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: bool
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


@dataclass
class _Conversion:
    metadata: dict[str, Any]
    report: TokenizerReport


@dataclass
class _Vocab:
    """tokenizer.json's ids → strings, with added-token flags; ``tokens`` is dense (holes filled as UNUSED)."""

    tokens: list[str]
    types: list[int]
    added: dict[int, dict[str, Any]] = field(default_factory=dict)

    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------

def tokenizer_metadata(model_dir: str | Path, *, vocab_size: int | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF keys for the Hugging Face tokenizer in ``model_dir``, as ``{key: value}``.

    Values are plain Python: str, bool, int ids, ``list[str]`` tokens/merges, ``list[int]`` token types,
    ``list[float]`` scores, ``bytes`` (precompiled charsmap). ``vocab_size`` (default: ``config.json``'s, else
    the tokenizer's) pads the token list with UNUSED ``[PAD{i}]`` tokens up to the embedding's row count.
    Raises :class:`ExportError` when llama.cpp cannot tokenize like ``tokenizer.json`` does.
    """
    return _convert(Path(model_dir), vocab_size).metadata


def add_tokenizer(writer: Any, model_dir: str | Path, *, vocab_size: int | None = None) -> TokenizerReport:
    """Write the tokenizer keys of ``model_dir`` into ``writer`` (a ``gguf.GGUFWriter``).

    See :func:`tokenizer_metadata`; returns what was written, for the CLI's ``--json``.
    """
    conv = _convert(Path(model_dir), vocab_size)
    for key, value in conv.metadata.items():
        _write_key(writer, key, value)
    return conv.report


def _write_key(writer: Any, key: str, value: Any) -> None:
    if key == "tokenizer.chat_template":
        writer.add_chat_template(value)
    elif key == _K + "scores":
        writer.add_array(key, [float(v) for v in value])
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (bytes, list)):
        writer.add_array(key, value)
    else:  # pragma: no cover - _convert only produces the types above
        raise TypeError(f"{key}: unsupported value type {type(value).__name__}")


# ------------------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------------------

def _convert(model_dir: Path, vocab_size: int | None) -> _Conversion:
    tok = _read_json(model_dir / "tokenizer.json", required=True)
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    special_map = _read_json(model_dir / "special_tokens_map.json") or {}
    model = tok.get("model") or {}
    kind = model.get("type") or _guess_model_type(model)
    warnings: list[str] = []

    vocab = _read_vocab(tok, kind, model_dir)
    if vocab_size is None:
        vocab_size = _config_vocab_size(model_dir)
    _pad_vocab(vocab, vocab_size, model_dir)
    _check_unique(vocab, model_dir / "tokenizer.json")
    _added_token_warnings(vocab, warnings)

    if kind == "BPE" and _is_byte_level(tok):
        meta, pre = _byte_level_bpe(tok, vocab, config, warnings)
    elif kind == "BPE":
        meta, pre = _spm_bpe(tok, vocab, warnings), None
    elif kind == "Unigram":
        meta, pre = _unigram(tok, vocab, warnings), None
    elif kind == "WordPiece":
        meta, pre = _wordpiece(tok, vocab, warnings), None
    else:
        raise ExportError(f"{model_dir / 'tokenizer.json'}: model type {kind!r} has no llama.cpp tokenizer "
                          "(supported: BPE, Unigram, WordPiece)")

    specials = _special_ids(tok, config, special_map, vocab)
    add_bos, add_eos = _add_bos_eos(tok, config, specials, meta[_K + "model"], warnings)
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("sep", "seperator_token_id"), ("pad", "padding_token_id"), ("mask", "mask_token_id")):
        if name in specials:
            meta[_K + key] = specials[name]
    if meta[_K + "model"] != "bert":
        meta[_K + "add_bos_token"] = add_bos
        meta[_K + "add_eos_token"] = add_eos
    for need, flag in (("bos", add_bos), ("eos", add_eos)):
        if flag and need not in specials:
            raise ExportError(f"{model_dir}: the tokenizer adds a {need} token but none is defined "
                              f"(llama.cpp needs tokenizer.ggml.{need}_token_id with add_{need}_token)")
    template = _chat_template(model_dir, config)
    if template is not None:
        meta["tokenizer.chat_template"] = template
    report = TokenizerReport(model=meta[_K + "model"], pre=pre, vocab_size=len(vocab.tokens), special=specials,
                             add_bos=add_bos, add_eos=add_eos, chat_template=template is not None,
                             warnings=tuple(warnings))
    return _Conversion(meta, report)


def _read_json(path: Path, required: bool = False) -> Any:
    if not path.is_file():
        if required:
            raise ExportError(f"{path}: not found; the GGUF exporter reads the tokenizer from tokenizer.json "
                              "(save it with a fast tokenizer: AutoTokenizer.from_pretrained(...).save_pretrained)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: invalid JSON ({e})") from e


def _guess_model_type(model: dict[str, Any]) -> str:
    if "merges" in model:
        return "BPE"
    if isinstance(model.get("vocab"), list):
        return "Unigram"
    return "WordPiece" if "continuing_subword_prefix" in model else "?"


def _config_vocab_size(model_dir: Path) -> int | None:
    cfg = _read_json(model_dir / "config.json") or {}
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(size) if isinstance(size, int) else None


def _read_vocab(tok: dict[str, Any], kind: str, model_dir: Path) -> _Vocab:
    model = tok["model"]
    raw = model.get("vocab")
    by_id: dict[int, str] = {}
    if kind == "Unigram":
        if not isinstance(raw, list):
            raise ExportError(f"{model_dir / 'tokenizer.json'}: Unigram model.vocab is not a list of [piece, score]")
        by_id = {i: str(item[0]) for i, item in enumerate(raw)}
    elif isinstance(raw, dict):
        by_id = {int(i): str(t) for t, i in raw.items()}
    else:
        raise ExportError(f"{model_dir / 'tokenizer.json'}: model.vocab missing")
    added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = str(a["content"])
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(i, "") for i in range(n)]
    types = [NORMAL if i in by_id else UNUSED for i in range(n)]
    for i in range(n):
        if i not in by_id:
            tokens[i] = f"[PAD{i}]"
    for i, a in added.items():
        types[i] = CONTROL if a.get("special") else USER_DEFINED
    return _Vocab(tokens, types, added)


def _pad_vocab(vocab: _Vocab, vocab_size: int | None, model_dir: Path) -> None:
    if vocab_size is None or vocab_size == len(vocab.tokens):
        return
    if vocab_size < len(vocab.tokens):
        raise ExportError(f"{model_dir}: the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is "
                          f"{vocab_size}; llama.cpp needs one embedding row per token")
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)


def _check_unique(vocab: _Vocab, where: Path) -> None:
    seen: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        if t == "":  # never produced by Hugging Face; llama.cpp renames it the same way when loading
            t = vocab.tokens[i] = f"[EMPTY_{i}]"
            vocab.types[i] = UNUSED
        if t in seen:
            raise ExportError(f"{where}: tokens {seen[t]} and {i} are both {t!r} (as llama.cpp spells them); "
                              "llama.cpp maps each token text to one id")
        seen[t] = i


def _added_token_warnings(vocab: _Vocab, warnings: list[str]) -> None:
    for flag, what in (("lstrip", "swallows whitespace on its left"), ("rstrip", "swallows whitespace on its right"),
                       ("single_word", "only matches as a whole word")):
        names = [a["content"] for a in vocab.added.values() if a.get(flag)]
        if names:
            warnings.append(f"added token(s) {', '.join(map(repr, names[:5]))} {what} in Hugging Face "
                            f"({flag}=true); llama.cpp has no such flag, so text next to them can tokenize differently")


# ------------------------------------------------------------------------------------------------------------
# byte-level BPE ("gpt2")
# ------------------------------------------------------------------------------------------------------------

def _is_byte_level(tok: dict[str, Any]) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _flatten(tok.get("pre_tokenizer"), "pretokenizers"))


def _flatten(node: dict[str, Any] | None, children: str) -> list[dict[str, Any]]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(children) or [] for leaf in _flatten(child, children)]
    return [node]


def _byte_level_bpe(tok: dict[str, Any], vocab: _Vocab, config: dict[str, Any],
                    warnings: list[str]) -> tuple[dict[str, Any], str]:
    model = tok["model"]
    _check_bpe_model(model)
    for norm in _flatten(tok.get("normalizer"), "normalizers"):
        if norm.get("type") == "NFC":
            warnings.append("tokenizer.json normalizes to NFC, llama.cpp does not normalize: text that is not "
                            "already NFC (decomposed accents) tokenizes differently")
        else:
            raise ExportError(f"tokenizer.json: normalizer {norm.get('type')!r} before a byte-level BPE has no "
                              "llama.cpp equivalent (llama.cpp's BPE tokenizer does not normalize)")
    regexes = _split_regexes(tok.get("pre_tokenizer"))
    merges = _merges(model)
    if not merges:
        raise ExportError("tokenizer.json: the BPE model has no merges; llama.cpp's BPE tokenizer needs "
                          "tokenizer.ggml.merges")
    ranks = {pair: r for r, pair in enumerate(merges)}
    pre = _choose_pre(regexes, bool(model.get("ignore_merges")), vocab, ranks,
                      bool(config.get("clean_up_tokenization_spaces", False)), warnings)
    meta = {
        _K + "model": "gpt2",
        _K + "pre": pre,
        _K + "tokens": vocab.tokens,
        _K + "token_type": vocab.types,
        _K + "merges": [f"{a} {b}" for a, b in merges],
    }
    return meta, pre


def _check_bpe_model(model: dict[str, Any]) -> None:
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ExportError(f"tokenizer.json: BPE {key}={model[key]!r} has no llama.cpp equivalent")
    if model.get("dropout"):
        raise ExportError(f"tokenizer.json: BPE dropout={model['dropout']} (random merges) has no llama.cpp equivalent")


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json merges in rank order, from either encoding: ``"a b"`` strings or ``["a", "b"]`` pairs."""
    out: list[tuple[str, str]] = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, sep, b = m.partition(" ")
            if not sep or not a or not b or " " in b:
                raise ExportError(f"tokenizer.json: merge {m!r} is not two tokens separated by one space")
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            a, b = str(m[0]), str(m[1])
            if " " in a or " " in b:
                raise ExportError(f"tokenizer.json: merge {m!r} contains a space; llama.cpp stores merges as "
                                  "'a b' strings and cannot represent it")
        else:
            raise ExportError(f"tokenizer.json: merge {m!r} is neither 'a b' nor [a, b]")
        out.append((a, b))
    return out


def _split_regexes(pre: dict[str, Any] | None) -> list[str]:
    """The regexes ``pre`` splits with, in order (Split patterns, Digits, ByteLevel's GPT-2 regex)."""
    out: list[str] = []
    leaves = _flatten(pre, "pretokenizers")
    for i, p in enumerate(leaves):
        t = p.get("type")
        if t == "Split":
            if p.get("behavior") != "Isolated" or p.get("invert"):
                raise ExportError(f"tokenizer.json: Split behavior={p.get('behavior')!r} invert={p.get('invert')} "
                                  "— llama.cpp only splits 'Isolated' (every match and every gap is a word)")
            pattern = p.get("pattern") or {}
            out.append(pattern["Regex"] if "Regex" in pattern else re.escape(pattern.get("String", "")))
        elif t == "Digits":
            out.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        elif t == "ByteLevel":
            if i != len(leaves) - 1:
                raise ExportError("tokenizer.json: a pre-tokenizer after ByteLevel sees byte-encoded text; "
                                  "llama.cpp splits raw text only")
            if p.get("add_prefix_space"):
                raise ExportError("tokenizer.json: ByteLevel add_prefix_space=true; llama.cpp's BPE tokenizer "
                                  "cannot add a leading space")
            if p.get("use_regex", True):
                out.append(_HF_BYTELEVEL)
        else:
            raise ExportError(f"tokenizer.json: pre-tokenizer {t!r} has no llama.cpp BPE equivalent")
    return out


def _canon(regex: str) -> str:
    """``regex`` with differences that do not change its matches removed (see module docstring)."""
    s = regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")
    s = _expand_case_insensitive(s)
    return re.sub(r"(?<!\\)\{1\}", "", s)


def _expand_case_insensitive(s: str) -> str:
    """``(?i:'s|ll)`` → ``(?:'[sS]|[lL][lL])``, the form llama.cpp's std::regex can run (ASCII letters only)."""
    out, pos = [], 0
    while (start := s.find("(?i:", pos)) >= 0:
        end = s.find(")", start)
        body = s[start + 4:end]
        if end < 0 or "(" in body or re.search(r"[^\x00-\x7f]|-", body):
            break
        out.append(s[pos:start] + "(?:" + _case_fold_body(body) + ")")
        pos = end + 1
    out.append(s[pos:])
    return "".join(out)


def _case_fold_body(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            out.append(body[i:i + 2])
            i += 2
        elif c == "[":
            j = body.index("]", i)
            chars = "".join(ch.lower() + ch.upper() if ch.isalpha() else ch for ch in body[i + 1:j])
            out.append("[" + "".join(dict.fromkeys(chars)) + "]")
            i = j + 1
        else:
            out.append(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c)
            i += 1
    return "".join(out)


def _choose_pre(regexes: list[str], ignore_merges: bool, vocab: _Vocab, ranks: dict[tuple[str, str], int],
                clean_up: bool, warnings: list[str]) -> str:
    """The ``tokenizer.ggml.pre`` whose regexes equal ``regexes`` (after :func:`_canon`) and whose merge flag fits."""
    aliases = {_canon(k): _canon(v) for k, v in {**_ALIASES_EXACT, **_ALIASES_APPROX}.items()}
    approx = {_canon(k) for k in _ALIASES_APPROX}
    canon = [_canon(r) for r in regexes]
    wanted = [{r, aliases.get(r, r)} for r in canon]  # llama.cpp may run a regex as is or as its own rewrite

    def equal(rx: tuple[str, ...]) -> bool:
        return len(rx) == len(wanted) and all(_canon(r) in w for r, w in zip(rx, wanted))

    groups = [g for g, rx in _PRE_REGEXES.items() if equal(rx)]
    if not groups:
        raise ExportError(_no_match_message(regexes))
    names = [p for p in _PRE_NAMES if p.regexes in groups]
    fitting = [p for p in names if p.ignore_merges == ignore_merges]
    if not fitting and _merges_reach_every_token(vocab, ranks):
        fitting = names  # every token is its own merge result: ignore_merges changes nothing
    if not fitting:
        raise ExportError(
            f"tokenizer.json: pre-tokenizer regex matches llama.cpp's {', '.join(p.name for p in names)} but "
            f"ignore_merges={ignore_merges} differs from what llama.cpp ties to that name, and some tokens are not "
            "the result of their own merges, so llama.cpp would split them differently")
    best = min(fitting, key=lambda p: (bool(p.side_effect), p.clean_spaces != clean_up, _PRE_NAMES.index(p)))
    if best.clean_spaces != clean_up:
        warnings.append(f"llama.cpp's '{best.name}' {'removes' if best.clean_spaces else 'keeps'} the space in "
                        "\" ,\" \" .\" \" 's\" when detokenizing with llama_detokenize, unlike this tokenizer "
                        f"(clean_up_tokenization_spaces={clean_up}); token ids and token pieces are unaffected")
    rewritten = any(r in approx and _canon(g) != r for r, g in zip(canon, _PRE_REGEXES[best.regexes]))
    if rewritten:
        warnings.append(f"llama.cpp's '{best.name}' regex is its own rewrite of this tokenizer's letter-case "
                        "classes; words mixing non-ASCII upper/lower case letters can split differently")
    collapsed = [r for r in _PRE_REGEXES[best.regexes]
                 if r not in _CUSTOM_SPLITTERS and re.search(r"\\p\{L[ultmo]\}", r)]
    if collapsed and not rewritten:
        warnings.append(f"llama.cpp evaluates the '{best.name}' regex with std::regex over collapsed Unicode "
                        r"categories (\p{Lu} and \p{Ll} both become 'letter'); non-ASCII text can split differently")
    return best.name


def _no_match_message(regexes: list[str]) -> str:
    shown = " then ".join(repr(r) for r in regexes) or "(none: no Split/ByteLevel regex)"
    joined = "\n".join(_canon(r) for r in regexes)
    scored = []
    for group, rx in _PRE_REGEXES.items():
        ratio = difflib.SequenceMatcher(None, joined, "\n".join(_canon(r) for r in rx)).ratio()
        first = next(p.name for p in _PRE_NAMES if p.regexes == group)
        scored.append((ratio, first, rx))
    scored.sort(key=lambda x: -x[0])
    near = "; ".join(f"{name} ({ratio:.0%} similar: {' then '.join(map(repr, rx))})" for ratio, name, rx in scored[:3])
    return (f"tokenizer.json: pre-tokenizer regex {shown} equals none of llama.cpp's pre-tokenizers, so llama.cpp "
            f"would split text differently. Nearest: {near}")


def _merges_reach_every_token(vocab: _Vocab, ranks: dict[tuple[str, str], int]) -> bool:
    """True when BPE over each normal token's own characters yields that token (then ``ignore_merges`` is moot)."""
    return all(_bpe(list(t), ranks) == [t] for t, ty in zip(vocab.tokens, vocab.types) if ty == NORMAL and len(t) > 1)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Hugging Face BPE on one word: merge the lowest-ranked adjacent pair (leftmost on ties) until none is left."""
    while len(symbols) > 1:
        best = min(((ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in ranks), default=None)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


# ------------------------------------------------------------------------------------------------------------
# SentencePiece-style BPE ("llama", llama.cpp's SPM tokenizer)
# ------------------------------------------------------------------------------------------------------------

def _spm_bpe(tok: dict[str, Any], vocab: _Vocab, warnings: list[str]) -> dict[str, Any]:
    """Llama-2/Mistral style: ``▁`` for spaces, byte_fallback. llama.cpp's SPM merges any adjacent pair whose
    concatenation is a token, highest score first, so the merges must hold every such pair (as a tokenizer.json
    converted from SentencePiece does) and the scores are the negated rank of each token's first merge."""
    model = tok["model"]
    _check_bpe_model(model)
    index = vocab.index()
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in index]
    if not model.get("byte_fallback") or missing:
        why = "byte_fallback is off" if not model.get("byte_fallback") else f"{missing[0]} and {len(missing) - 1} " \
              "more byte tokens are missing"
        raise ExportError(f"tokenizer.json: BPE without ByteLevel maps to llama.cpp's SentencePiece tokenizer, which "
                          f"spells unknown characters as <0x00>..<0xFF> byte tokens, but {why}")
    for i, t in enumerate(vocab.tokens):
        if _BYTE_TOKEN.fullmatch(t) and vocab.types[i] == NORMAL:
            vocab.types[i] = BYTE
    merges = _merges(model)
    ranks = {pair: r for r, pair in enumerate(merges)}
    normal = {t for t, ty in zip(vocab.tokens, vocab.types) if ty == NORMAL}
    if isinstance(model.get("unk_token"), str) and model["unk_token"] in index:
        vocab.types[index[model["unk_token"]]] = UNKNOWN

    def symbol(s: str) -> bool:  # what llama.cpp's SPM can hold: a token, or any one character
        return s in normal or len(s) == 1

    for t in normal:
        for k in range(1, len(t)):
            if symbol(t[:k]) and symbol(t[k:]) and (t[:k], t[k:]) not in ranks:
                raise ExportError(
                    f"tokenizer.json: tokens {t[:k]!r} + {t[k:]!r} make the token {t!r} but the merges have no "
                    f"'{t[:k]} {t[k:]}' rule; llama.cpp's SentencePiece tokenizer merges every such pair, so it would "
                    "tokenize differently (merges converted from a SentencePiece model list them all)")
    scores = [0.0] * len(vocab.tokens)
    first_rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        first_rank.setdefault(a + b, r)
    order = sorted(first_rank, key=first_rank.__getitem__)
    last_seen = {a + b: r for r, (a, b) in enumerate(merges)}
    for pos, t in enumerate(order[:-1]):
        if last_seen[t] > first_rank[order[pos + 1]]:
            raise ExportError(f"tokenizer.json: the merges making {t!r} are interleaved with those making "
                              f"{order[pos + 1]!r}; llama.cpp ranks whole tokens by one score each")
    for t, r in first_rank.items():
        if t in index:
            scores[index[t]] = -float(r)
    if model.get("ignore_merges") and not _merges_reach_every_token(vocab, ranks):
        raise ExportError("tokenizer.json: ignore_merges=true and some tokens are not the result of their own "
                          "merges; llama.cpp's SentencePiece tokenizer always merges")
    prefix, _ = _spm_whitespace(tok, vocab, "llama", warnings)
    meta = {
        _K + "model": "llama",
        _K + "pre": "default",
        _K + "tokens": vocab.tokens,
        _K + "scores": scores,
        _K + "token_type": vocab.types,
        _K + "add_space_prefix": prefix,
    }
    return meta


# ------------------------------------------------------------------------------------------------------------
# whitespace handling shared by the SentencePiece-style models, checked on probe strings
# ------------------------------------------------------------------------------------------------------------

# How each model family treats spaces, checked on these probes (the rare ones hold a literal ▁ in the text).
_PROBES = ("hello world", " hello", "  hello", "hello ", "hello  ", "a  b", "a   b c", "a\tb", "a\nb", "\n x",
           "x ", "   ", "a\n", "a \n", "\n", " \n ", "\ta\t ", "日本 語", "")
_RARE_PROBES = (f"{SPIECE}a", f" {SPIECE} a", f"a{SPIECE}")


def _spm_whitespace(tok: dict[str, Any], vocab: _Vocab, mode: str, warnings: list[str]) -> tuple[bool, bool]:
    """llama.cpp's (add_space_prefix, remove_extra_whitespaces) that reproduce tokenizer.json's normalizer +
    pre-tokenizer on probe strings; ``mode`` is "llama" (SPM) or "t5" (UGM)."""
    from tokenizers import Tokenizer

    family = "SentencePiece" if mode == "llama" else "Unigram"
    norm_nodes = _flatten(tok.get("normalizer"), "normalizers")
    for n in norm_nodes:
        _check_space_normalizer(n, mode)
    if _splits_words(tok, family, warnings):
        inner = [t for t, ty in zip(vocab.tokens, vocab.types) if ty == NORMAL and SPIECE in t[1:]]
        if inner:
            raise ExportError(f"tokenizer.json: the pre-tokenizer splits words at spaces but token {inner[0]!r} "
                              "spans a space; llama.cpp does not split, so it could use such tokens")
    probes = _PROBES + _RARE_PROBES
    _charsmap(norm_nodes)  # refuse a malformed charsmap before tokenizers (or later llama.cpp) trips on it
    try:  # tokenizers panics (pyo3 PanicException, a BaseException) on e.g. a malformed precompiled_charsmap
        hf = Tokenizer.from_str(json.dumps({**tok, "added_tokens": [], "post_processor": None, "decoder": None}))
        charsmap = _charsmap_normalizer(norm_nodes)
        hf_views = {p: _hf_view(hf, p) for p in probes}
        mapped = {p: charsmap(p) for p in probes}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise ExportError(f"tokenizer.json: tokenizers cannot run its normalizer/pre-tokenizer "
                          f"({type(e).__name__}: {e})") from e

    def diffs(probes: tuple[str, ...], prefix: bool, merge: bool) -> list[tuple[str, str, str]]:
        views = ((p, hf_views[p], _llama_view(mapped[p], prefix, merge, mode)) for p in probes)
        return [v for v in views if v[1] != v[2]]

    options = [(True, False), (False, False)] + ([(True, True), (False, True)] if mode == "t5" else [])
    for prefix, merge in options:
        if not diffs(_PROBES, prefix, merge):
            rare = diffs(_RARE_PROBES, prefix, merge)
            if rare:
                warnings.append(f"text holding a literal '{SPIECE}' differs: tokenizer.json turns {rare[0][0]!r} "
                                f"into {rare[0][1]!r}, llama.cpp into {rare[0][2]!r}")
            return prefix, merge
    prefix, merge = min(options, key=lambda o: len(diffs(_PROBES, *o)))
    probe, want, got = diffs(_PROBES, prefix, merge)[0]
    raise ExportError(f"tokenizer.json's normalizer/pre-tokenizer turn {probe!r} into {want!r}; llama.cpp's {family} "
                      f"tokenizer cannot (its closest setting, add_space_prefix={prefix} remove_extra_whitespaces="
                      f"{merge}, gives {got!r}), so it would tokenize differently")


def _replaces_spaces(tok: dict[str, Any]) -> bool:
    return any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " " and n.get("content") == SPIECE
               for n in _flatten(tok.get("normalizer"), "normalizers"))


def _hf_view(hf: Any, text: str) -> str:
    """tokenizer.json's normalizer then pre-tokenizer on ``text``, the pieces joined back."""
    s = hf.normalizer.normalize_str(text) if hf.normalizer is not None else text
    return "".join(p for p, _ in hf.pre_tokenizer.pre_tokenize_str(s)) if hf.pre_tokenizer is not None else s


def _splits_words(tok: dict[str, Any], family: str, warnings: list[str]) -> bool:
    """Whether tokenizer.json's pre-tokenizer (Metaspace / WhitespaceSplit only) cuts the text into words."""
    split = False
    for p in _flatten(tok.get("pre_tokenizer"), "pretokenizers"):
        t = p.get("type")
        if t == "Metaspace":
            if p.get("replacement", SPIECE) != SPIECE:
                raise ExportError(f"tokenizer.json: Metaspace replacement {p.get('replacement')!r}; llama.cpp "
                                  f"escapes spaces as {SPIECE!r}")
            split = split or bool(p.get("split", True))
            if p.get("prepend_scheme") == "first":
                warnings.append(f"tokenizer.json prepends '{SPIECE}' only to the first text segment (prepend_scheme="
                                "'first'); llama.cpp also prepends it after every special token in the text")
        elif t == "WhitespaceSplit":
            split = True
        elif t == "Split" and (p.get("pattern") or {}).get("String") == " " and _replaces_spaces(tok):
            continue  # Gemma: the normalizer already turned every space into ▁, so this never splits
        else:
            raise ExportError(f"tokenizer.json: pre-tokenizer {t!r} has no equivalent in llama.cpp's {family} "
                              "tokenizer")
    return split


def _check_space_normalizer(node: dict[str, Any], mode: str) -> None:
    t = node.get("type")
    if t in ("Replace", "Prepend", "Strip") or (t == "Precompiled" and mode == "t5"):
        if t == "Replace":
            pat = node.get("pattern") or {}
            text = pat.get("String", pat.get("Regex", ""))
            bare = re.sub(r"\\A|\\z|\{\d*,?\d*\}|[+|*^$]", "", text)
            if not set(bare + (node.get("content") or "")) <= {" ", SPIECE}:
                raise ExportError(f"tokenizer.json: normalizer Replace({text!r} → {node.get('content')!r}) rewrites "
                                  "more than spaces; llama.cpp cannot")
        if t == "Prepend" and node.get("prepend") not in (SPIECE, " "):
            raise ExportError(f"tokenizer.json: normalizer Prepend({node.get('prepend')!r}); llama.cpp can only "
                              f"prepend {SPIECE!r}")
        return
    what = "only normalizes through a precompiled_charsmap" if mode == "t5" else "does not normalize"
    raise ExportError(f"tokenizer.json: normalizer {t!r} has no llama.cpp equivalent (its "
                      f"{'Unigram' if mode == 't5' else 'SentencePiece'} tokenizer {what} and handles spaces)")


def _charsmap_normalizer(norm_nodes: list[dict[str, Any]]) -> Callable[[str], str]:
    blob = _charsmap(norm_nodes)
    if blob is None:
        return lambda s: s
    from tokenizers import normalizers

    return normalizers.Precompiled(blob).normalize_str


def _charsmap(norm_nodes: list[dict[str, Any]]) -> bytes | None:
    """The Precompiled normalizer's SentencePiece charsmap, checked as llama.cpp reads it (a bad one aborts it)."""
    nodes = [n for n in norm_nodes if n.get("type") == "Precompiled" and n.get("precompiled_charsmap")]
    if not nodes:
        return None
    try:
        blob = base64.b64decode(nodes[0]["precompiled_charsmap"], validate=True)
    except ValueError as e:
        raise ExportError(f"tokenizer.json: precompiled_charsmap is not base64 ({e})") from e
    size = int.from_bytes(blob[:4], "little") if len(blob) >= 4 else -1
    units = size // 4
    root = int.from_bytes(blob[4:8], "little") >> 10 if units else 0
    if size < 0 or size % 4 or size + 4 >= len(blob) or units % 256 or root + 255 >= units:
        raise ExportError(f"tokenizer.json: precompiled_charsmap ({len(blob)} bytes, trie {size} bytes) is not a "
                          "SentencePiece double array (whole 256-unit blocks, root inside, replacement strings after)")
    return blob


def _llama_view(text: str, prefix: bool, merge: bool, mode: str) -> str:
    """What llama.cpp feeds its SPM (``llama``) or UGM (``t5``, ``text`` already through the charsmap) tokenizer
    for one text fragment."""
    if mode == "llama":  # llama_vocab::impl::tokenize, LLAMA_VOCAB_TYPE_SPM
        return ((" " if prefix else "") + text).replace(" ", SPIECE) if text else ""
    out, prepended, in_word = [], False, False  # llm_tokenizer_ugm_session::normalize
    for c in text:
        if c != " ":
            if not in_word:
                in_word = True
                if (prefix and not prepended) or merge:
                    out.append(SPIECE)
                    prepended = True
            out.append(c)
        else:
            in_word = False
            if not merge:
                out.append(SPIECE)
    return "".join(out)


# ------------------------------------------------------------------------------------------------------------
# Unigram ("t5", llama.cpp's UGM tokenizer)
# ------------------------------------------------------------------------------------------------------------

def _unigram(tok: dict[str, Any], vocab: _Vocab, warnings: list[str]) -> dict[str, Any]:
    """SentencePiece unigram. llama.cpp's UGM runs the same Viterbi (unknown characters cost min score - 10)
    over NORMAL/USER_DEFINED tokens, after the optional precompiled charsmap and its whitespace rules."""
    model = tok["model"]
    if model.get("byte_fallback"):
        raise ExportError("tokenizer.json: Unigram byte_fallback=true, but llama.cpp's Unigram (UGM) tokenizer has "
                          "no byte fallback: characters outside the vocabulary would become <unk> instead of <0xXX>")
    unk_id = model.get("unk_id")
    if unk_id is None:
        raise ExportError("tokenizer.json: Unigram model has no unk_id; llama.cpp's Unigram (UGM) tokenizer needs an "
                          "unknown token for characters outside the vocabulary (it would use id 2)")
    scores = [0.0] * len(vocab.tokens)
    for i, item in enumerate(model["vocab"]):
        scores[i] = float(item[1])
    vocab.types[unk_id] = UNKNOWN
    normal = [s for s, ty in zip(scores, vocab.types) if ty == NORMAL]
    hf_min = min(float(item[1]) for item in model["vocab"])
    if normal and min(normal) != hf_min:
        warnings.append(f"Hugging Face scores unknown characters from the lowest score of all pieces ({hf_min}), "
                        f"llama.cpp from the lowest normal piece ({min(normal)}): text with characters outside the "
                        "vocabulary can segment differently")
    if any(_f32(s) != s for s in scores):
        warnings.append("Unigram scores are float64 in tokenizer.json but float32 in GGUF: where two segmentations "
                        "of a word score (almost) the same, llama.cpp and Hugging Face can pick different ones "
                        "(SentencePiece-trained models store float32 scores and are unaffected)")
    prefix, merge = _spm_whitespace(tok, vocab, "t5", warnings)
    meta: dict[str, Any] = {
        _K + "model": "t5",
        _K + "pre": "default",
        _K + "tokens": vocab.tokens,
        _K + "scores": scores,
        _K + "token_type": vocab.types,
        _K + "add_space_prefix": prefix,
        _K + "remove_extra_whitespaces": merge,
    }
    charsmap = _charsmap(_flatten(tok.get("normalizer"), "normalizers"))
    if charsmap is not None:
        meta[_K + "precompiled_charsmap"] = charsmap
    return meta


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


# ------------------------------------------------------------------------------------------------------------
# WordPiece ("bert", llama.cpp's WPM tokenizer)
# ------------------------------------------------------------------------------------------------------------

def _wordpiece(tok: dict[str, Any], vocab: _Vocab, warnings: list[str]) -> dict[str, Any]:
    """BERT: llama.cpp writes word-initial pieces with a ``▁`` prefix and continuations bare (``##`` dropped)."""
    model = tok["model"]
    if model.get("continuing_subword_prefix", "##") != "##":
        raise ExportError(f"tokenizer.json: WordPiece continuing_subword_prefix "
                          f"{model['continuing_subword_prefix']!r}; llama.cpp assumes '##'")
    norms = _flatten(tok.get("normalizer"), "normalizers")
    pres = _flatten(tok.get("pre_tokenizer"), "pretokenizers")
    if [n.get("type") for n in norms] != ["BertNormalizer"] or [p.get("type") for p in pres] != ["BertPreTokenizer"]:
        raise ExportError("tokenizer.json: llama.cpp's WordPiece tokenizer implements exactly BertNormalizer + "
                          f"BertPreTokenizer, not {[n.get('type') for n in norms]} + {[p.get('type') for p in pres]}")
    bn = norms[0]
    if not bn.get("clean_text", True) or not bn.get("handle_chinese_chars", True):
        raise ExportError("tokenizer.json: BertNormalizer with clean_text/handle_chinese_chars off; llama.cpp always "
                          "does both")
    lowercase = bool(bn.get("lowercase", True))
    strip = bn.get("strip_accents")
    strip_accents = lowercase if strip is None else bool(strip)
    if strip_accents:
        warnings.append("llama.cpp strips accents by mapping each character to its base letter, not by full NFD: "
                        "characters NFD splits into several letters (Hangul syllables into jamo) tokenize differently")
    if model.get("max_input_chars_per_word"):
        warnings.append(f"words longer than {model['max_input_chars_per_word']} characters become the unknown token "
                        "in Hugging Face; llama.cpp has no such limit")
    tokens = [t if ty != NORMAL else (t[2:] if t.startswith("##") else SPIECE + t)
              for t, ty in zip(vocab.tokens, vocab.types)]
    unk = model.get("unk_token")
    index = {t: i for i, t in enumerate(vocab.tokens)}
    if unk in index:
        vocab.types[index[unk]] = UNKNOWN
    _check_unique(_Vocab(tokens, vocab.types), Path("tokenizer.json"))
    return {
        _K + "model": "bert",
        _K + "pre": "default",
        _K + "tokens": tokens,
        _K + "token_type": vocab.types,
        _K + "normalizer.lowercase": lowercase,
        _K + "normalizer.strip_accents": strip_accents,
    }


# ------------------------------------------------------------------------------------------------------------
# special tokens, add_bos/add_eos, chat template
# ------------------------------------------------------------------------------------------------------------

def _content(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _special_ids(tok: dict[str, Any], config: dict[str, Any], special_map: dict[str, Any],
                 vocab: _Vocab) -> dict[str, int]:
    index = vocab.index()
    names: dict[str, str] = {}
    for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        value = _content(config.get(f"{name}_token")) or _content(special_map.get(f"{name}_token"))
        if value is not None:
            names[name] = value
    model = tok["model"]
    if "unk" not in names:
        if isinstance(model.get("unk_token"), str):
            names["unk"] = model["unk_token"]
        elif model.get("unk_id") is not None:
            names["unk"] = vocab.tokens[int(model["unk_id"])]
    return {name: index[text] for name, text in names.items() if text in index}


def _add_bos_eos(tok: dict[str, Any], config: dict[str, Any], specials: dict[str, int], model_kind: str,
                 warnings: list[str]) -> tuple[bool, bool]:
    """Whether encoding adds bos/eos, from the post_processor (its single-sequence template) or tokenizer_config."""
    template = _single_template(tok.get("post_processor"))
    if model_kind == "bert":  # llama.cpp's WordPiece always adds bos (= [CLS]) … sep when asked for specials
        if template is None or len(template) != 3 or template[1] is not None:
            raise ExportError(f"tokenizer.json: post_processor adds {template} around the text; llama.cpp's "
                              "WordPiece tokenizer adds exactly one [CLS] before and one [SEP] after")
        specials["bos"], specials["sep"] = template[0], template[2]  # type: ignore[assignment]
        specials.setdefault("cls", specials["bos"])
        return True, False
    if template is None:
        return bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
    a = template.index(None)
    lead, trail = template[:a], template[a + 1:]
    if len(lead) > 1 or len(trail) > 1:
        raise ExportError(f"tokenizer.json: post_processor adds token ids {lead} before and {trail} after the text; "
                          "llama.cpp can add one bos before and one eos after")
    if lead and lead[0] != specials.get("bos"):
        specials["bos"] = lead[0]  # the token the template adds is what llama.cpp must add
    if trail and trail[0] != specials.get("eos"):
        specials["eos"] = trail[0]
    add_bos, add_eos = bool(lead), bool(trail)
    for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        if key in config and bool(config[key]) != value:
            warnings.append(f"tokenizer_config.json {key}={config[key]} disagrees with tokenizer.json's "
                            f"post_processor; following the post_processor ({value})")
    return add_bos, add_eos


def _single_template(post: dict[str, Any] | None) -> list[int | None] | None:
    """Token ids the post-processor puts around a single sequence (``None`` marks the text), or None if it adds none."""
    for node in _flatten(post, "processors"):
        t = node.get("type")
        if t == "TemplateProcessing":
            specials = node.get("special_tokens") or {}
            out: list[int | None] = []
            for piece in node.get("single") or []:
                if "Sequence" in piece:
                    out.append(None)
                else:
                    ids = (specials.get(piece["SpecialToken"]["id"]) or {}).get("ids") or []
                    out.extend(int(i) for i in ids)
            return out if None in out else None
        if t in ("BertProcessing", "RobertaProcessing"):
            return [int(node["cls"][1]), None, int(node["sep"][1])]
    return None


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = _read_json(model_dir / "chat_template.json")
    if isinstance(js, dict) and js.get("chat_template"):
        return js["chat_template"]
    value = config.get("chat_template")
    return value if isinstance(value, (str, list)) and value else None
