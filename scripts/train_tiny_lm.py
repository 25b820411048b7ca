#!/usr/bin/env python
"""Train lowbit's built-in demo language model ``builtin:tiny-lm``.

Dev script -- NOT imported by the package. It

1. builds a corpus from the English reStructuredText sources of the Python 3.11
   documentation (Debian package ``python3.11-doc``:
   /usr/share/doc/python3.11/html/_sources/**/*.rst.txt), lightly cleaned, split
   by *file* (sha1 of the relative path) into train / held-out;
2. trains a byte-level BPE tokenizer (``tokenizers``) on the train split;
3. trains a small Llama-architecture causal LM (``LlamaForCausalLM``) on CPU;
4. writes a Hugging Face model directory (default ``src/lowbit/data/tiny-lm``)
   with the model (safetensors), tokenizer, ``eval.txt`` (held-out text),
   ``calib.txt`` (calibration text from the train split) and ``README.md``.

Everything is seeded; re-running with the same arguments on the same corpus
reproduces the shipped model (up to tiny floating-point nondeterminism of CPU
kernels). The defaults are the settings of the shipped model:

    nice -n 10 .venv/bin/python scripts/train_tiny_lm.py

``--bench N`` only measures training throughput for N steps and exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CORPUS = "/usr/share/doc/python3.11/html/_sources"
DEFAULT_OUT = "src/lowbit/data/tiny-lm"
MAX_DIR_BYTES = 20 * 1000 * 1000

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
BOS, EOS, UNK, PAD = SPECIAL_TOKENS


# ----------------------------------------------------------------------------- corpus

_LABEL_RE = re.compile(r"^\.\. _[^:]*:\s*$")
_DIRECTIVE_RE = re.compile(r"^\.\. ([A-Za-z0-9_:-]+)::(.*)$")
_COMMENT_RE = re.compile(r"^\.\.(\s|$)")
_ADORN_RE = re.compile(r"^([=\-~^*#+`'\"._:])\1{2,}\s*$")
_ROLE_RE = re.compile(r":[A-Za-z0-9_.:+-]+:`([^`]*)`")
_LITERAL_RE = re.compile(r"``([^`]+)``")
_REF_TARGET_RE = re.compile(r"^(.*?)\s*<[^<>]*>$")
_LINK_RE = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")
_OPTION_RE = re.compile(r"^:[A-Za-z][A-Za-z -]*:(\s|$)")
_TABLE_BORDER_RE = re.compile(r"^\+[-=+]+\+$")
_FOOTREF_RE = re.compile(r"\s*\[(#[\w-]*|\d+)\]_")

# directives whose header line is dropped but whose indented body is kept
_KEEP_BODY = {
    "note", "warning", "tip", "important", "attention", "caution", "danger", "hint",
    "seealso", "impl-detail", "topic", "sidebar", "rubric", "productionlist",
    "code-block", "sourcecode", "doctest", "testcode", "testoutput", "parsed-literal",
    "epigraph", "table", "list-table", "availability", "glossary",
    "versionadded", "versionchanged", "deprecated", "deprecated-removed",
}
# API description directives: the signature on the header line is kept as text
_API = {
    "function", "method", "class", "attribute", "exception", "decorator",
    "decoratormethod", "classmethod", "staticmethod", "abstractmethod",
    "coroutinefunction", "coroutinemethod", "awaitablefunction", "awaitablemethod",
    "data", "describe", "object", "cmdoption", "option", "envvar", "opcode",
    "pdbcommand", "2to3fixer", "c:function", "c:macro", "c:type", "c:member",
    "c:var", "c:struct",
}
_ADMONITION_TEXT = {
    "note": "Note:", "warning": "Warning:", "important": "Important:",
    "caution": "Caution:", "seealso": "See also:", "impl-detail":
    "CPython implementation detail:",
}


def _inline(text: str) -> str:
    def role(m: re.Match) -> str:
        t = m.group(1)
        r = _REF_TARGET_RE.match(t)
        if r and r.group(1):
            t = r.group(1)
        return t.lstrip("~!")

    text = _LINK_RE.sub(r"\1", text)
    text = _ROLE_RE.sub(role, text)
    text = _LITERAL_RE.sub(r"\1", text)
    return text


def clean_rst(raw: str) -> str:
    """Light cleanup of Sphinx rst into readable text.

    Drops labels, comments, index/metadata directives, directive options and
    title adornment lines; keeps the bodies of notes / API descriptions / code
    blocks; turns inline roles (:func:`len`) and literals (``x``) into plain text
    and version directives into "New in version 3.x." sentences.
    """
    out: list[str] = []
    drop_indent: int | None = None  # drop lines (and blanks) indented deeper than this
    in_directive_head = False  # skip option lines right after a kept directive
    for line in raw.splitlines():
        line = line.replace("\t", "    ")
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if drop_indent is not None:
            if stripped == "" or indent > drop_indent:
                continue
            drop_indent = None
        if in_directive_head:
            if stripped and _OPTION_RE.match(stripped):
                continue
            in_directive_head = False
        if _LABEL_RE.match(stripped):
            continue
        m = _DIRECTIVE_RE.match(stripped)
        if m:
            name, arg = m.group(1).lower(), m.group(2).strip()
            pad = " " * indent
            if name in _API:
                if arg:
                    out.append(pad + _inline(arg))
                in_directive_head = True
                continue
            if name in _KEEP_BODY:
                if name == "versionadded":
                    out.append(pad + f"New in version {arg}.")
                elif name in ("versionchanged", "deprecated", "deprecated-removed"):
                    ver, _, rest = arg.partition(" ")
                    lead = ("Changed in version" if name == "versionchanged"
                            else "Deprecated since version")
                    out.append(pad + f"{lead} {ver}:" + (" " + _inline(rest) if rest else ""))
                elif name in _ADMONITION_TEXT:
                    out.append(pad + _ADMONITION_TEXT[name] + (" " + _inline(arg) if arg else ""))
                elif name in ("rubric", "topic", "sidebar") and arg:
                    out.append(pad + _inline(arg))
                in_directive_head = True
                continue
            drop_indent = indent  # index, toctree, module, highlight, include, ...
            continue
        if _COMMENT_RE.match(stripped):  # comments, substitutions, footnotes, link targets
            drop_indent = indent
            continue
        if _ADORN_RE.match(stripped) or _TABLE_BORDER_RE.match(stripped):
            continue
        line = _FOOTREF_RE.sub("", _inline(line)).rstrip()
        if line.endswith("::"):
            body = line[:-2].rstrip()
            line = body + ":" if body else ""
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip()
    return text + "\n" if text else ""


def split_of(relpath: str, heldout_pct: int) -> str:
    h = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16) % 100
    return "heldout" if h < heldout_pct else "train"


def load_corpus(corpus_dir: str, heldout_pct: int) -> dict[str, list[tuple[str, str]]]:
    root = Path(corpus_dir)
    files = sorted(p for p in root.rglob("*.rst.txt") if p.is_file())
    if not files:
        raise SystemExit(f"no *.rst.txt files under {corpus_dir} (apt install python3.11-doc)")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for p in files:
        rel = p.relative_to(root).as_posix()
        text = clean_rst(p.read_text(encoding="utf-8", errors="replace"))
        if len(text) < 200:
            continue
        splits[split_of(rel, heldout_pct)].append((rel, text))
    return splits


def sample_text(docs: list[tuple[str, str]], target_bytes: int, per_doc_bytes: int,
                seed: int) -> str:
    """~target_bytes of text: documents in seeded random order, at most per_doc_bytes
    from each (cut at a paragraph boundary)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    parts: list[str] = []
    size = 0
    for i in order:
        if size >= target_bytes:
            break
        limit = min(per_doc_bytes, target_bytes - size)
        text = docs[i][1]
        enc = text.encode("utf-8")
        if len(enc) > limit:
            part = enc[:limit].decode("utf-8", errors="ignore")
            cut = part.rfind("\n\n")
            if cut < limit // 4:
                continue
            text = part[:cut].rstrip() + "\n"
        parts.append(text)
        size += len(text.encode("utf-8")) + 1
    return "\n".join(parts)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(train_texts: list[str], vocab_size: int, max_len: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # like Llama: encode() prepends <s>
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def fix_tokenizer_config(out_dir: Path):
    """transformers 5 writes tokenizer_class "TokenizersBackend"; the portable name
    "PreTrainedTokenizerFast" loads the same class on transformers 5 and also on 4.x."""
    p = out_dir / "tokenizer_config.json"
    cfg = json.loads(p.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def encode_docs(tokenizer, docs: list[tuple[str, str]]):
    """One token stream: <s> doc </s> <s> doc </s> ..."""
    import torch

    # the backend tokenizer directly: no "longer than model_max_length" warnings
    enc = [e.ids for e in tokenizer.backend_tokenizer.encode_batch([t for _, t in docs])]
    ids: list[int] = []
    for e in enc:
        ids.extend(e)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model

def build_model(args, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for name in ("hidden", "intermediate"):
        if getattr(args, name) % 128:
            raise SystemExit(f"--{name} must be a multiple of 128 (group-wise quantization)")
    if args.heads * args.head_dim != args.hidden:
        raise SystemExit("--heads * --head-dim must equal --hidden")
    if not (args.kv_heads < args.heads and args.heads % args.kv_heads == 0):
        raise SystemExit("--kv-heads must divide --heads and be smaller (GQA)")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # GPT-2 style scaled init of the residual output projections
        std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, std)
            layer.mlp.down_proj.weight.normal_(0.0, std)
    return model


def make_optimizer(model, args):
    import torch

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    t = min(1.0, t)
    lo = args.lr * args.min_lr_ratio
    return lo + 0.5 * (args.lr - lo) * (1.0 + math.cos(math.pi * t))


class Batches:
    """Seeded epochs over non-overlapping windows of seq_len+1 tokens (stride seq_len)."""

    def __init__(self, ids, seq_len: int, batch: int, seed: int):
        self.ids, self.seq_len, self.batch, self.seed = ids, seq_len, batch, seed
        self.epoch, self.pos, self.perm, self.starts = -1, 0, None, None
        self._new_epoch()

    def _new_epoch(self):
        import torch

        self.epoch += 1
        # shift the window grid every epoch so windows differ between epochs
        offset = (self.epoch * 97) % self.seq_len
        n = (len(self.ids) - 1 - offset) // self.seq_len
        self.starts = offset + torch.arange(n) * self.seq_len
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.perm = torch.randperm(n, generator=g)
        self.pos = 0

    def next(self):
        import torch

        if self.pos + self.batch > len(self.perm):
            self._new_epoch()
        idx = self.starts[self.perm[self.pos:self.pos + self.batch]]
        self.pos += self.batch
        rows = torch.stack([self.ids[s:s + self.seq_len + 1] for s in idx.tolist()])
        return rows[:, :-1], rows[:, 1:]


def lm_loss(model, x, y):
    import torch.nn.functional as F

    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def perplexity(model, ids, window: int = 256, bf16: bool = False):
    """Non-overlapping windows of `window` tokens; mean NLL over all predicted tokens
    (window-1 predictions per full window; the tail window is included)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for s in range(0, len(ids), window):
            w = ids[s:s + window]
            if len(w) < 2:
                break
            logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += len(w) - 1
    model.train()
    nll = total / count
    return nll, math.exp(nll), count


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--work-dir", default=None, help="scratch dir (default: a temp dir)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--heldout-pct", type=int, default=6, help="%% of files held out")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for training (fp32 master weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--eval-window", type=int, default=256)
    p.add_argument("--eval-bytes", type=int, default=50_000)
    p.add_argument("--calib-bytes", type=int, default=150_000)
    p.add_argument("--bench", type=int, default=0, help="only time N training steps")
    return p.parse_args(argv)


def log(msg: str):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    own_work = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="tiny_lm_")) if own_work else Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    t_start = time.time()

    splits = load_corpus(args.corpus, args.heldout_pct)
    train_docs, held_docs = splits["train"], splits["heldout"]
    nbytes = {k: sum(len(t.encode()) for _, t in v) for k, v in splits.items()}
    log(f"corpus: train {len(train_docs)} files {nbytes['train']/1e6:.2f} MB, "
        f"held-out {len(held_docs)} files {nbytes['heldout']/1e6:.2f} MB")

    tokenizer = train_tokenizer([t for _, t in train_docs], args.vocab_size, args.seq_len, tok_dir)
    train_ids = encode_docs(tokenizer, train_docs)
    held_ids = encode_docs(tokenizer, held_docs)
    log(f"tokenizer: vocab {len(tokenizer)}; train {len(train_ids)} tokens "
        f"({nbytes['train']/len(train_ids):.2f} bytes/token), held-out {len(held_ids)} tokens")

    eval_text = sample_text(held_docs, args.eval_bytes, 6000, args.seed)
    calib_text = sample_text(train_docs, args.calib_bytes, 8000, args.seed + 1)
    eval_ids = torch.tensor(tokenizer.backend_tokenizer.encode(eval_text).ids, dtype=torch.long)
    val_ids = eval_ids[: 16 * args.eval_window]  # cheap progress metric

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} params; {model.config.num_hidden_layers} layers, "
        f"hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/"
        f"{args.kv_heads} kv, vocab {model.config.vocab_size}, tied")

    opt = make_optimizer(model, args)
    batches = Batches(train_ids, args.seq_len, args.batch, args.seed)
    model.train()
    steps = args.bench or args.steps
    tok_per_step = args.batch * args.seq_len
    t_train = time.time()
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    recent: list[float] = []
    for step in range(steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches.next()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        lv = loss.item()
        loss_acc, n_acc = loss_acc + lv, n_acc + 1
        recent = (recent + [lv])[-50:]
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            dt = time.time() - t_log
            log(f"step {step+1}/{steps} loss {loss_acc/n_acc:.4f} lr {lr:.2e} "
                f"gnorm {gnorm:.2f} tok/s {n_acc*tok_per_step/dt:.0f} "
                f"elapsed {time.time()-t_train:.0f}s epoch {batches.epoch}")
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if not args.bench and args.val_every and (step + 1) % args.val_every == 0:
            t_val = time.time()
            nll, ppl, _ = perplexity(model, val_ids, args.eval_window)
            log(f"step {step+1} val nll {nll:.4f} ppl {ppl:.2f} (first {len(val_ids)} eval tokens)")
            t_log += time.time() - t_val  # keep val time out of the tok/s figure
    train_time = time.time() - t_train
    if args.bench:
        log(f"bench: {steps} steps in {train_time:.1f}s = {steps*tok_per_step/train_time:.0f} tok/s")
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        return
    final_loss = sum(recent) / len(recent)
    torch.save(model.state_dict(), work / "final_state_dict.pt")  # safety copy

    # ---------------------------------------------------------------- write output dir
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    fix_tokenizer_config(out)
    (out / "eval.txt").write_text(eval_text, encoding="utf-8")
    (out / "calib.txt").write_text(calib_text, encoding="utf-8")
    dtype = "float32"
    if sum(f.stat().st_size for f in out.iterdir()) > MAX_DIR_BYTES - 20_000:
        log("directory too large in float32; re-saving weights in float16")
        (out / "model.safetensors").unlink()
        model.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
        model.float()
        dtype = "float16"

    # ---------------------------------------------------------------- evaluate reloaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(str(out))
    m2 = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor(tok2.backend_tokenizer.encode(eval_text).ids, dtype=torch.long)
    assert ids[0].item() == tok2.bos_token_id
    nll, ppl, count = perplexity(m2, ids, args.eval_window)
    log(f"eval.txt: {len(ids)} tokens, {count} predicted, nll {nll:.4f}, ppl {ppl:.2f}")
    prompt = "The Python interpreter"
    enc = tok2(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = m2.generate(**enc, max_new_tokens=48, do_sample=False,
                          pad_token_id=tok2.pad_token_id)
    sample = tok2.decode(gen[0], skip_special_tokens=True)
    log(f"sample: {sample!r}")

    cfg = m2.config
    cmd_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    command = "nice -n 10 .venv/bin/python scripts/train_tiny_lm.py" + (
        " " + shlex.join(cmd_args) if cmd_args else "")
    stats = {
        "params": n_params, "dtype": dtype, "steps": args.steps,
        "tokens_trained": args.steps * tok_per_step, "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids), "train_time_s": round(train_time, 1),
        "total_time_s": round(time.time() - t_start, 1), "final_train_loss": round(final_loss, 4),
        "eval_nll": round(nll, 4), "eval_ppl": round(ppl, 3), "eval_tokens": len(ids),
        "eval_window": args.eval_window, "bf16": args.bf16,
    }
    log("stats: " + json.dumps(stats))
    dir_bytes = sum(f.stat().st_size for f in out.iterdir())
    readme = f"""# builtin:tiny-lm

A tiny demo causal language model shipped with `lowbit` so examples and tests can
quantize a real Hugging Face checkpoint offline. It is a toy: it writes
Python-documentation-flavoured English and code, with frequent mistakes.

## Model

- Architecture: Hugging Face Llama (`LlamaForCausalLM`), {cfg.num_hidden_layers} layers,
  hidden {cfg.hidden_size}, intermediate (SwiGLU) {cfg.intermediate_size},
  {cfg.num_attention_heads} attention heads / {cfg.num_key_value_heads} KV heads (GQA),
  head_dim {cfg.head_dim}, RoPE, RMSNorm, max positions {cfg.max_position_embeddings},
  tied input/output embeddings.
- Every `nn.Linear` has `in_features` that is a multiple of 128
  ({cfg.hidden_size} or {cfg.intermediate_size}), so group-wise quantization with
  group size 128 applies to all of them.
- Parameters: {n_params:,} (tied embedding counted once); weights stored in {dtype}
  (`model.safetensors`). Directory size about {dir_bytes/1e6:.1f} MB.

## Tokenizer

Byte-level BPE (`tokenizers`), vocabulary {len(tokenizer)} including the special tokens
`<s>` (bos), `</s>` (eos), `<unk>`, `<pad>`; trained on the train split. Encoding
prepends `<s>`. Loads with `AutoTokenizer.from_pretrained` as a fast tokenizer;
`model_max_length` = {tokenizer.model_max_length}.

## Data

English reStructuredText sources of the Python 3.11 documentation (Debian package
`python3.11-doc`, `/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`), lightly
cleaned (labels, index/metadata directives, comments and title underlines removed;
inline roles and literals turned into plain text). Split by file:
a file is held out when `int(sha1(relative_path), 16) % 100 < {args.heldout_pct}`.

- train: {len(train_docs)} files, {nbytes['train']/1e6:.2f} MB, {len(train_ids):,} tokens
- held-out: {len(held_docs)} files, {nbytes['heldout']/1e6:.2f} MB, {len(held_ids):,} tokens
- `eval.txt`: {len(eval_text.encode())/1e3:.0f} KB sampled from held-out files only
  (never seen in training or tokenizer training)
- `calib.txt`: {len(calib_text.encode())/1e3:.0f} KB sampled from train files (for GPTQ/AWQ calibration)

## Training

{args.steps} steps x batch {args.batch} x {args.seq_len} tokens = {args.steps*tok_per_step:,} tokens
(about {args.steps*tok_per_step/len(train_ids):.2f} epochs), AdamW (betas 0.9/0.95,
weight decay {args.weight_decay}), peak lr {args.lr} with {args.warmup} warmup steps and
cosine decay to {args.lr*args.min_lr_ratio:g}, gradient clipping {args.clip},
{"bf16 autocast" if args.bf16 else "float32"}, seed {args.seed}, on {args.threads} CPU threads:
{train_time/60:.1f} min of training (average {args.steps*tok_per_step/train_time:,.0f} tokens/s; wall time
depends on CPU load).

- Final train loss (mean of last 50 steps): {final_loss:.3f}
- Held-out perplexity on `eval.txt`: **{ppl:.2f}** (mean NLL {nll:.3f} nats/token over
  {count:,} predicted tokens; the text is tokenized once with a leading `<s>` and cut
  into non-overlapping windows of {args.eval_window} tokens, each window scored
  independently, the first token of each window not predicted).

Greedy sample, prompt "{prompt}":

```
{sample}
```

## Retrain

```
{command}
```
(run from the repository root; the defaults of `scripts/train_tiny_lm.py` are the
settings of this model.)
"""
    (out / "README.md").write_text(readme, encoding="utf-8")
    dir_bytes = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({dir_bytes/1e6:.2f} MB): {sorted(f.name for f in out.iterdir())}")
    if dir_bytes > MAX_DIR_BYTES:
        raise SystemExit(f"output dir is {dir_bytes} bytes > {MAX_DIR_BYTES}")
    if own_work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
