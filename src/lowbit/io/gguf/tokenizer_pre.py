"""llama.cpp's BPE pre-tokenizers as data: the regexes each ``tokenizer.ggml.pre`` value splits with.

Used both ways: exporting, a tokenizer.json's own split regexes are matched against these sets
(tokenizer.py); importing, a GGUF's ``pre`` name gives the regexes its rebuilt tokenizer splits with.
"""

from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------------------
# llama.cpp's BPE pre-tokenizers (src/llama-vocab.cpp, llm_tokenizer_bpe): the regexes each one splits with,
# applied in order, every piece (matched or not) kept as a word. Types sharing a regex set are grouped under
# the first; KIMI_K2 / AFMOE / WHITESPACE / GEMMA4 / SARVAM_MOE are left out on purpose: their "regex" is a
# trigger for hand-written code or they do not byte-encode, so no tokenizer.json Split pattern means them.
# ------------------------------------------------------------------------------------------------------------
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CASED_WORDS = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS
                + r"?|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS + "?")
_LOOKAHEAD_WORDS = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS
                    + r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?")
_CJK_PUNCT = (r'''[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+'''
              r"| ?[\p{P}\p{S}]+")

_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "LLAMA3": (_LLAMA3,),  # also DBRX, SMAUG, CHATGLM4
    "JAIS2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
              r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",),
    "DEEPSEEK_LLM": (
        r"[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",  # noqa: E501 (\u escapes: these letters change under NFC)
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ),
    "DEEPSEEK3_LLM": (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", _CJK_PUNCT + r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "SPARK2_5": (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", _CJK_PUNCT + r"|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"),
    "YOUTU": (
        r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
        _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "DEEPSEEK_CODER": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    "FALCON": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "STARCODER": (r"\p{N}", _GPT2),  # also REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA, MELLUM2
    "GPT2": (_GPT2,),  # also MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING
    "QWEN2": (_QWEN2,),  # also STABLELM2, HUNYUAN, SOLAR_OPEN, GROK_2
    "QWEN35": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+",),
    "PORO": (r" ?[^(\s|.,!?…。，、।۔،)]+",),  # also BLOOM, GPT3_FINNISH
    "VIKING": (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    "TEKKEN": (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])"
               r"([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "CHAMELEON": (r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", _GPT2),
    "GPT4O": (_LOOKAHEAD_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),  # + MINIMAX_M2
    "GRANITE_EMB_MULTI": (_LOOKAHEAD_WORDS.replace(r"(?=[\p{L}])", r"(?=[\p{L}\p{M}])")
                          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "TINY_AYA": (r"\d{1,3}(?=(?:\d{3})*\b)",
                 _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "SUPERBPE": (r"\p{N}+", r"(?=(\d{3})+(?!\d))"),
    "BAILINGMOE": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                   r"[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "SEED_CODER": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+",),
    "UFAKZEKA": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "LAGUNA": (r"[^\n]+|[\n]+", _QWEN2),
    "EXAONE_MOE": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+"
                   r"[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",),
    "MINICPM5": (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+"),
}

# Spellings tokenizer.json uses for regexes llama.cpp rewrote (its source quotes them as "original regex from
# tokenizer.json"), mapped to llama.cpp's form. ``(?i:…)`` needs no entry: :func:`_canon` expands it.
_HF_BYTELEVEL = _GPT2 + r"|\s+"  # tokenizers' ByteLevel(use_regex=True); llama.cpp's custom GPT-2 splitter
_ALIASES_EXACT: dict[str, str] = {
    _HF_BYTELEVEL: _GPT2,  # the trailing \s+ only ever takes one space before a non-space: the same words
    # possessive ?+ / ++ cannot backtrack into anything here: the next item needs a char the class excludes
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+":
        _PRE_REGEXES["BAILINGMOE"][0],
}
_ALIASES_APPROX: dict[str, str] = {  # llama.cpp's look-ahead rewrite of the case classes is not exact
    _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": _PRE_REGEXES["GPT4O"][0],
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}"
    r"\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        _PRE_REGEXES["TEKKEN"][0],
}
# regexes llama.cpp splits with hand-written code (unicode.cpp) rather than std::regex over collapsed categories
_CUSTOM_SPLITTERS = {_GPT2, _LLAMA3, _QWEN2, _PRE_REGEXES["QWEN35"][0], r"[^\n]+|[\n]+", r"\d{1,3}(?=(?:\d{3})*\b)"}


@dataclass(frozen=True)
class _PreName:
    """One ``tokenizer.ggml.pre`` value: its regex group and the flags llama.cpp ties to the name."""

    name: str
    regexes: str  # key of _PRE_REGEXES
    ignore_merges: bool = False  # a word that is itself a token skips the merges (HF BPE ``ignore_merges``)
    clean_spaces: bool = True  # llama_detokenize drops the space in " ," " ." " 's" …
    side_effect: str = ""  # anything else the name changes in llama.cpp (avoided when another name fits)


# In order of preference among names that behave the same; long-standing names first.
_PRE_NAMES: tuple[_PreName, ...] = (
    _PreName("gpt-2", "GPT2"),
    _PreName("trillion", "GPT2", clean_spaces=False),
    _PreName("roberta-bpe", "GPT2", side_effect="add_sep"),
    _PreName("llama-bpe", "LLAMA3", ignore_merges=True),
    _PreName("dbrx", "LLAMA3"),
    _PreName("chatglm-bpe", "LLAMA3", side_effect="no default bos"),
    _PreName("glm4", "LLAMA3", ignore_merges=True, side_effect="no default bos"),
    _PreName("qwen2", "QWEN2", clean_spaces=False),
    _PreName("stablelm2", "QWEN2"),
    _PreName("qwen35", "QWEN35", clean_spaces=False),
    _PreName("starcoder", "STARCODER"),
    _PreName("smollm", "STARCODER", clean_spaces=False),
    _PreName("falcon", "FALCON"),
    _PreName("deepseek-llm", "DEEPSEEK_LLM", clean_spaces=False),
    _PreName("deepseek-coder", "DEEPSEEK_CODER", clean_spaces=False),
    _PreName("deepseek-v3", "DEEPSEEK3_LLM", clean_spaces=False),
    _PreName("spark2_5", "SPARK2_5", clean_spaces=False),
    _PreName("youtu", "YOUTU", ignore_merges=True, clean_spaces=False),
    _PreName("jais-2", "JAIS2"),
    _PreName("bloom", "PORO"),
    _PreName("poro-chat", "PORO", clean_spaces=False),
    _PreName("viking", "VIKING", clean_spaces=False),
    _PreName("tekken", "TEKKEN", ignore_merges=True, clean_spaces=False),
    _PreName("chameleon", "CHAMELEON", clean_spaces=False),
    _PreName("gpt-4o", "GPT4O", clean_spaces=False),
    _PreName("granite-embed-multi-97m", "GRANITE_EMB_MULTI", ignore_merges=True, clean_spaces=False),
    _PreName("tiny_aya", "TINY_AYA", clean_spaces=False),
    _PreName("superbpe", "SUPERBPE", clean_spaces=False),
    _PreName("bailingmoe", "BAILINGMOE", clean_spaces=False),
    _PreName("seed-coder", "SEED_CODER", clean_spaces=False),
    _PreName("ufakzeka", "UFAKZEKA", clean_spaces=False),
    _PreName("laguna", "LAGUNA", clean_spaces=False),
    _PreName("exaone-moe", "EXAONE_MOE"),
    _PreName("minicpm5", "MINICPM5", ignore_merges=True),
)


def regexes_for_pre(name: str) -> tuple[str, ...]:
    """The split regexes llama.cpp applies for ``tokenizer.ggml.pre = name`` (``default``: GPT-2's)."""
    for pre in _PRE_NAMES:
        if pre.name == name:
            return _PRE_REGEXES[pre.regexes]
    if name in ("default", ""):
        return _PRE_REGEXES["GPT2"]
    from lowbit.errors import UnsupportedModelError

    raise UnsupportedModelError(f"tokenizer.ggml.pre {name!r} is not one lowbit knows; known: "
                                + ", ".join(p.name for p in _PRE_NAMES))
