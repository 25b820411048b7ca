"""Planned mixed precision (lowbit plan) vs llama.cpp's quant types on the built-in LM, on the same token windows.

Rows:
* llama.cpp's own quantizer (llama-quantize through the C API) from lowbit's F16 export, each type twice:
  as llama.cpp writes it (the tied token embedding / output head quantized too, Q6_K for most types),
  and with that tensor kept F16 ("emb F16") — the same embedding the lowbit models keep float, so the
  block layers are all that differs.
* lowbit plans at 3.0 / 3.5 / 4.0 / 4.5 bits per weight (GPTQ and RTN candidates, KL weighting),
  quantized with their recipe. The plans cover the tied token embedding / output head too (quantized
  once and shared, ``tied_head: share``), as llama.cpp's types quantize token_embd; the bits per
  weight are over the blocks' linear layers and that matrix.

* lowbit plans over GGUF block types (``--gguf-candidates``, default q2_k,q3_k,q4_0,q4_k,q5_k,q6_k,q8_0), one per
  llama.cpp type, budgeted to that type's file size, written by ``lowbit export --plan`` and scored by
  llama.cpp itself: the per-tensor mix the planner picks against llama.cpp's fixed mix, same runtime.

Scoring: the lowbit-format plans use formats GGUF has no block type for (int2/int3, groups of 64/128, nf4), so they
cannot be written code for code; re-rounding them to GGUF types would measure llama.cpp's rounding,
not the plan. So each side is scored by its own runtime on the *same* windows of the built-in
held-out text: llama.cpp's files by llama.cpp's logits, lowbit's models by lowbit's forward, both
through the same NLL sum (tests/gguf_support.py). The first two rows check the two scorers agree on the
float model.

Size: "block bpw" is bits per weight over the transformer blocks' linear layers (codes + scales +
zero-points, from the GGUF tensor table); "bytes" is the whole GGUF file, and for lowbit rows the
size of the same file holding the plan's tensors: the F16 export's header, tokenizer and norms plus
the planned bytes (blocks and the shared embedding/head). Plans are compared with llama.cpp's types
of the same or the next larger file.

    .venv/bin/python bench/plan.py [--methods gptq,rtn] [--targets 3.0,3.5,4.0,4.5] [--cache-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import llama_cpp  # noqa: E402
import torch  # noqa: E402

from gguf_support import llama_cpp_ppl, lowbit_ppl, open_llama, token_windows  # noqa: E402
from lowbit.algorithms.calib_data import CalibConfig  # noqa: E402
from lowbit.eval.size import model_size  # noqa: E402
from lowbit.eval.perplexity import read_text, tokenize_text  # noqa: E402
from lowbit.io.checkpoint import load  # noqa: E402
from lowbit.io.gguf.reader import read_gguf  # noqa: E402
from lowbit.io.gguf.writer import export_gguf  # noqa: E402
from lowbit.models.resolve import builtin_dir  # noqa: E402
from lowbit.plan import make_plan, measure_model, parse_candidates  # noqa: E402
from lowbit.quantize import load_tokenizer, quantize  # noqa: E402

TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")


def quantize_gguf(src: Path, dst: Path, ftype: str, keep_embedding_f16: bool) -> None:
    """llama-quantize through the C API; optionally the token embedding / output tensor stay F16."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if keep_embedding_f16:
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
        params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed")


def embedding_bytes(path: Path) -> int:
    """Bytes of the token embedding (tied: also the output head) and of a separate output head."""
    g = read_gguf(path)
    return sum(t.nbytes for name, t in g.tensors.items() if name in ("token_embd.weight", "output.weight"))


def block_bpw(path: Path) -> tuple[float, int]:
    """(bits per weight, bytes) over the blocks' 2-D weights (blk.N.*.weight) of a GGUF file."""
    g = read_gguf(path)
    blocks = [t for name, t in g.tensors.items() if name.startswith("blk.") and len(t.shape) == 2]
    nbytes = sum(t.nbytes for t in blocks)
    return 8 * nbytes / sum(t.n_elements for t in blocks), nbytes


def report(rows: list[dict]) -> None:
    """The table, then each plan against llama.cpp's types of the same or larger file size."""
    print("\n| model | block bpw | block MB | file MB | ppl |\n|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["block_bpw"], r["model"])):
        print(f"| {r['model']} | {r['block_bpw']:.3f} | {r['block_bytes'] / 1e6:.3f} | {r['bytes'] / 1e6:.3f} | "
              f"{r['ppl']:.4f} |")
    print("\nplans vs llama.cpp's types (stock: token_embd quantized as llama.cpp chooses) by whole-file size:")
    theirs = [r for r in rows if r["model"].startswith("llama.cpp") and not r.get("embedding_f16")]
    for r in (r for r in rows if r["model"].startswith("lowbit")):
        larger = sorted((t for t in theirs if t["bytes"] >= r["bytes"]), key=lambda t: t["bytes"])
        if not larger:
            print(f"  {r['model']:26s} ppl {r['ppl']:.4f}: no llama.cpp type is as large ({r['bytes'] / 1e6:.3f} MB)")
            continue
        nxt = larger[0]
        if r.get("gguf_plan_for"):  # compared with the type whose size it was planned for
            nxt = next(t for t in theirs if t["model"] == r["gguf_plan_for"])
        verdict = "at or below" if r["ppl"] <= nxt["ppl"] else "ABOVE"
        print(f"  {r['model']:26s} {r['bytes'] / 1e6:.3f} MB ppl {r['ppl']:.4f} | next larger file {nxt['model']} "
              f"({nxt['bytes'] / 1e6:.3f} MB): {nxt['ppl']:.4f} ({100 * (r['ppl'] / nxt['ppl'] - 1):+.2f} %) {verdict}")


def gguf_plans(args: argparse.Namespace, root: Path, cache_dir: Path, tok, calib: CalibConfig, windows, rows,
               float_gguf_bytes: int, add) -> None:
    """Plans over GGUF block types at each llama.cpp type's file size, exported and scored by llama.cpp itself."""
    from lowbit.models.build import output_head_name

    float_model = load("builtin:tiny-lm")
    cands = parse_candidates(args.gguf_candidates, "rtn")
    tag = hashlib.sha256(args.gguf_candidates.encode()).hexdigest()[:8]
    measurement, hit = measure_model(float_model, tok, "builtin:tiny-lm", method="rtn", calib=calib,
                                     candidates=cands, kl_samples=args.kl_samples,
                                     cache=cache_dir / f"tiny-lm-gguf-{args.calib_samples}-kl{args.kl_samples}-{tag}"
                                                       ".measure.json")
    print(f"# gguf measurement: {measurement.seconds:.0f} s{' (cached)' if hit else ''}", flush=True)
    head = output_head_name(float_model)
    for theirs in [r for r in rows if r.get("type") and not r.get("embedding_f16")]:
        payload = theirs["bytes"] - float_gguf_bytes  # what the llama.cpp file spends on the planned tensors
        try:
            plan = make_plan(measurement, budget_bytes=measurement.float_bytes + payload)
        except Exception as exc:  # a budget below every plan
            print(f"# no GGUF plan within {theirs['model']}'s size: {exc}")
            continue
        out = root / f"plan-{theirs['type']}.gguf"
        export_gguf("builtin:tiny-lm", out, type="q8_0", tensor_plan=plan.gguf_types, show_progress=False,
                    overwrite=True)
        types = plan.gguf_types or {}
        blocks = [n for n in types if n != head]
        bpw, nbytes = block_bpw(out)
        add({"model": f"lowbit GGUF plan @ {theirs['type']} size", "block_bpw": bpw, "block_bytes": nbytes,
             "bytes": out.stat().st_size, "ppl": llama_cpp_ppl(open_llama(llama_cpp, out, args.seq_len), windows),
             "scorer": "llama.cpp", "gguf_plan_for": theirs["model"], "head_type": types.get(head),
             "spec_counts": plan.summary()["spec_counts"], "planned_blocks": len(blocks)})
        out.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=0, help="0: every full window of the held-out text")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--methods", default="gptq,rtn")
    ap.add_argument("--inputs", default="float", choices=("float", "reference"),
                    help="what each block's measurement sees: the float model's activations or the earlier blocks "
                         "quantized at their reference candidates")
    ap.add_argument("--gguf-candidates", default="q2_k,q3_k,q4_0,q4_k,q5_k,q6_k,q8_0",
                    help="also plan over these GGUF block types at each llama.cpp type's file size, export the plans "
                         "and score them with llama.cpp ('' to skip)")
    ap.add_argument("--kl-samples", type=int, default=8, help="calibration windows of each layer's KL check")
    ap.add_argument("--candidates", default=None, help="comma-separated candidate formats (default: the method's list)")
    ap.add_argument("--targets", default="3.0,3.5,4.0,4.5")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--cache-dir", default=None, help="keep the measurements here (reused by later runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None, help="only print the table of an earlier --json run")
    args = ap.parse_args()
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()))
        return
    torch.manual_seed(0)

    tok = load_tokenizer(load("builtin:tiny-lm"))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    windows = token_windows(ids, args.seq_len, args.windows or None)
    calib = CalibConfig(source="builtin", samples=args.calib_samples, seq_len=args.seq_len)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        print(f"{row['model']:44s} {row['block_bpw']:6.3f} bpw {row['block_bytes'] / 1e6:7.3f} MB blocks "
              f"{row['bytes'] / 1e6:7.3f} MB  ppl {row['ppl']:8.4f}  [{row['scorer']}]", flush=True)

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cache_dir = Path(args.cache_dir) if args.cache_dir else root
        f16 = root / "f16.gguf"
        export_gguf("builtin:tiny-lm", f16, type="f16", show_progress=False)
        bpw, nbytes = block_bpw(f16)
        # header, tokenizer and norms: what a GGUF holding a plan's tensors has besides them
        float_gguf_bytes = f16.stat().st_size - nbytes - embedding_bytes(f16)
        add({"model": "F16 (lowbit export)", "block_bpw": bpw, "block_bytes": nbytes, "bytes": f16.stat().st_size,
             "ppl": llama_cpp_ppl(open_llama(llama_cpp, f16, args.seq_len), windows), "scorer": "llama.cpp"})
        float_model = load("builtin:tiny-lm")
        add({"model": "float32 (lowbit)", "block_bpw": 32.0, "block_bytes": 2 * nbytes,
             "bytes": model_size(float_model).size_bytes, "ppl": lowbit_ppl(float_model, windows), "scorer": "lowbit"})
        cached_rows = cache_dir / f"llamacpp-{args.seq_len}-{len(windows)}.json"  # deterministic: reused by reruns
        known = {r["model"]: r for r in json.loads(cached_rows.read_text())} if cached_rows.is_file() else {}
        for t in args.types.split(","):
            for keep in (False, True):
                label = f"llama.cpp {t}{' (emb F16)' if keep else ''}"
                if label in known:
                    add(known[label])
                    continue
                out = root / f"{t}{'-embf16' if keep else ''}.gguf"
                quantize_gguf(f16, out, t, keep)
                bpw, nbytes = block_bpw(out)
                add({"model": label, "block_bpw": bpw, "block_bytes": nbytes, "bytes": out.stat().st_size,
                     "ppl": llama_cpp_ppl(open_llama(llama_cpp, out, args.seq_len), windows),
                     "scorer": "llama.cpp", "type": t, "embedding_f16": keep})
                out.unlink()
                known[label] = rows[-1]
                cached_rows.write_text(json.dumps(list(known.values()), indent=1))
        for method in args.methods.split(","):
            start = time.perf_counter()
            float_model = load("builtin:tiny-lm")
            cands = parse_candidates(args.candidates, method) if args.candidates else None
            tag = f"-{hashlib.sha256(args.candidates.encode()).hexdigest()[:8]}" if args.candidates else ""
            measurement, hit = measure_model(float_model, tok, "builtin:tiny-lm", method=method, calib=calib,
                                             candidates=cands, kl_samples=args.kl_samples, inputs=args.inputs,
                                             cache=cache_dir / f"tiny-lm-{method}-{args.calib_samples}-kl{args.kl_samples}-{args.inputs}{tag}.measure.json")
            print(f"# {method} measurement: {measurement.seconds:.0f} s{' (cached)' if hit else ''}; "
                  f"additivity {measurement.extra.get('additivity')}", flush=True)
            for target in (float(x) for x in args.targets.split(",")):
                plan = make_plan(measurement, target_bpw=target)
                model = quantize(load("builtin:tiny-lm"), plan.recipe, calibration=calib, tokenizer=tok)
                s = plan.summary()
                blocks = [n for n in plan.layer_specs if n != measurement.provenance.get("tied_head")]
                nb = sum(model.get_submodule(n).weight.nbytes for n in blocks)
                add({"model": f"lowbit plan {method} {target} bpw", "plan_bpw": s["bits_per_weight"],
                     "block_bpw": 8 * nb / sum(model.get_submodule(n).weight.numel for n in blocks),
                     "block_bytes": nb, "bytes": float_gguf_bytes + s["quantized_bytes"],
                     "ppl": lowbit_ppl(model, windows), "scorer": "lowbit", "predicted_kl": s["predicted_error"],
                     "spec_counts": s["spec_counts"]})
            print(f"# {method}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.gguf_candidates:
            gguf_plans(args, root, cache_dir, tok, calib, windows, rows, float_gguf_bytes, add)

    report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
