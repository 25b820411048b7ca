"""``lowbit plan``: per-layer formats under a size budget → a recipe ``lowbit quantize --recipe`` applies."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lowbit.errors import InvalidSpecError, OutputExistsError


def add_parser(sub: Any, common: Any) -> None:
    p = sub.add_parser(
        "plan", help="choose a format per layer within a size budget; write a recipe and the size/quality front",
        description="Measure every linear layer's output error on calibration data at each candidate format (exact "
                    "stored bytes too), weight the errors by each layer's measured effect on the model's KL, and pick "
                    "one format per layer minimising the predicted KL within the budget (exact multiple-choice "
                    "knapsack). Writes RECIPE (YAML or JSON) for `lowbit quantize MODEL --recipe RECIPE`, the Pareto "
                    "front to RECIPE.pareto.json and the measurement to RECIPE.measure.json (reused while the model, "
                    "calibration data, method and candidates match).")
    p.add_argument("model", help="float model directory or builtin:tiny-lm")
    p.add_argument("-o", "--out", required=True, metavar="RECIPE", help="recipe to write (.yaml/.yml or .json)")
    p.add_argument("--overwrite", action="store_true", help="replace RECIPE and its .pareto.json if they exist")
    size = p.add_argument_group("target (a size, an error bound, or both)")
    size.add_argument("--target-bpw", type=float, default=None, metavar="BITS",
                      help="bits per weight over the planned layers (codes + scales + zero-points), e.g. 3.5")
    size.add_argument("--budget", default=None, metavar="SIZE",
                      help="whole-model stored size incl. the float parts (embeddings, norms), e.g. 2.5GB, 800MiB")
    size.add_argument("--max-kl", type=float, default=None, metavar="NATS",
                      help="smallest plan whose predicted KL (nats/token, calibration data) is at most NATS")
    size.add_argument("--max-error", type=float, default=None, metavar="E",
                      help="smallest plan whose predicted error (in the --weighting's unit) is at most E")
    m = p.add_argument_group("measurement")
    m.add_argument("--method", default="rtn", choices=("rtn", "hqq", "gptq"),
                   help="how each candidate is quantized, measured and later applied (default rtn)")
    m.add_argument("--candidates", default=None, metavar="LIST",
                   help="comma-separated formats, e.g. int3-g64-asym,int4-g32-asym-dq,nf4-b64,int8-ch-sym,fp8_e4m3-ch "
                        "(-dq: 8-bit double-quantized scales). Default: int2/int3 at groups 32/64/128, int4/int5 at "
                        "32/64, int6 g64, all asym-dq, and int8-ch-sym; rtn adds nf4-b64-dq and fp8_e4m3-ch, "
                        "gptq/hqq int4-g128-asym-dq")
    m.add_argument("--weighting", default="kl", choices=("kl", "relative"),
                   help="kl: calibrate each layer's error to the model's KL with one end-to-end check per layer "
                        "(default); relative: unweighted relative output errors (no model runs; a poorer predictor)")
    m.add_argument("--kl-samples", type=int, default=8, metavar="N",
                   help="calibration windows for the per-layer KL checks (default 8)")
    m.add_argument("--measure-cache", default=None, metavar="PATH",
                   help="measurement JSON to reuse/write (default: RECIPE.measure.json)")
    m.add_argument("--remeasure", action="store_true", help="measure again even when the cache matches")
    m.add_argument("--float-head", action="store_true",
                   help="keep an output head tied to the input embedding in float (by default the plan covers it: "
                        "quantized once and shared with the embedding, recipe option tied_head: share)")
    c = p.add_argument_group("calibration")
    from lowbit.cli import add_calibration_args

    add_calibration_args(c)
    c.add_argument("--device", default="cpu", help="compute device (cpu, cuda …)")
    v = p.add_argument_group("verification")
    v.add_argument("--verify", action="store_true",
                   help="quantize with the recipe and report measured perplexity / KL beside the prediction")
    v.add_argument("--ppl", default="builtin", metavar="TEXTFILE",
                   help="text for --verify (default: the built-in held-out text)")
    v.add_argument("--seq-len", type=int, default=256, help="--verify window in tokens (default 256)")
    v.add_argument("--save-model", default=None, metavar="DIR", help="--verify: also save the quantized model")
    common(p)


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.io.checkpoint import load
    from lowbit.memory import parse_size
    from lowbit.plan.measure import is_gguf, parse_candidates, write_json_atomic
    from lowbit.plan.planner import make_plan, measure_model
    from lowbit.plan.recipe_out import check_recipe_targets, sibling, write_gguf_plan, write_recipe
    from lowbit.quantize import load_tokenizer

    start = time.perf_counter()
    recipe_path = Path(args.out)
    pareto_path = sibling(recipe_path, ".pareto.json")
    cache_path = Path(args.measure_cache) if args.measure_cache else sibling(recipe_path, ".measure.json")
    if recipe_path.suffix not in (".yaml", ".yml", ".json"):
        raise InvalidSpecError(f"{recipe_path}: the recipe must be .yaml, .yml or .json")
    for path in (recipe_path, pareto_path):
        if path.exists() and not args.overwrite:
            raise OutputExistsError(f"{path}: already exists; choose another -o or pass --overwrite")
    if all(v is None for v in (args.target_bpw, args.budget, args.max_kl, args.max_error)):
        raise InvalidSpecError("give a size (--target-bpw or --budget) or an error bound (--max-kl / --max-error)")
    if args.max_kl is not None and args.max_error is not None:
        raise InvalidSpecError("give --max-kl or --max-error, not both")
    if args.max_kl is not None and args.weighting != "kl":
        raise InvalidSpecError("--max-kl bounds the predicted KL, which needs --weighting kl (use --max-error)")
    if args.save_model and not args.verify:
        raise InvalidSpecError("--save-model saves the --verify model; add --verify")
    if args.save_model and is_gguf(parse_candidates(args.candidates, args.method)):
        raise InvalidSpecError("--save-model: a GGUF plan is applied by lowbit export --format gguf --plan, not saved "
                               "as a lowbit model")
    budget = parse_size(args.budget) if args.budget is not None else None
    candidates = parse_candidates(args.candidates, args.method)
    calib = CalibConfig(args.calib, args.calib_samples, args.calib_seq_len, args.seed, args.calib_field)

    model = load(args.model)
    if getattr(model, "lowbit_method", None):
        raise InvalidSpecError(f"{args.model}: is already quantized; plan from the float model")
    tokenizer = load_tokenizer(model)
    measurement, cache_hit = measure_model(
        model, tokenizer, args.model, candidates=candidates, method=args.method, calib=calib,
        weighting=args.weighting, kl_samples=args.kl_samples, device=args.device, cache=cache_path,
        reuse=not args.remeasure, head=not args.float_head, show_progress=not args.quiet)
    max_error = args.max_kl if args.max_kl is not None else args.max_error
    plan = make_plan(measurement, target_bpw=args.target_bpw, budget_bytes=budget, max_error=max_error)
    summary = plan.summary()
    header = _header(args, summary, recipe_path, pareto_path, cache_path, gguf=plan.recipe is None)
    if plan.recipe is None:  # GGUF block types: per-tensor types for lowbit export --plan
        write_gguf_plan(plan.gguf_types or {}, recipe_path, header, model=args.model)
    else:
        check_recipe_targets(model, plan.recipe, plan.layer_specs)
        write_recipe(plan.recipe, recipe_path, header)
    if args.verify:
        plan.extra["verify"] = _verify(args, model, plan, tokenizer, calib)
    write_json_atomic(pareto_path, plan.pareto_json())
    result = {"recipe": str(recipe_path), "pareto": str(pareto_path), "measure_cache": str(cache_path),
              "cache_hit": cache_hit, "model": args.model, "method": args.method,
              "candidates": measurement.candidate_names, **summary, "measure_seconds": round(measurement.seconds, 3)}
    if "verify" in plan.extra:
        result["verify"] = plan.extra["verify"]
    result["seconds"] = round(time.perf_counter() - start, 3)
    if not args.json:
        _print(result)
    return result


def _verify(args: argparse.Namespace, model: Any, plan: Any, tokenizer: Any, calib: Any) -> dict[str, Any]:
    from lowbit.eval.perplexity import read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.plan.planner import verify_plan

    path = builtin_dir("tiny-lm") / "eval.txt" if args.ppl == "builtin" else Path(args.ppl)
    ids = tokenize_text(tokenizer, read_text(path))
    recipe = plan.recipe if plan.recipe is not None else plan.gguf_types
    report, quantized = verify_plan(args.model, model, recipe, tokenizer, ids, calib=calib, seq_len=args.seq_len,
                                    device=args.device, show_progress=not args.quiet)
    if report["bits_per_weight"] is None:  # a GGUF plan: its sizes are the plan's (exact block bytes)
        summary = plan.summary()
        report["bits_per_weight"], report["size_bytes"] = summary["bits_per_weight"], summary["size_bytes"]
    report["text"] = str(path)
    report["predicted_error"] = plan.solution.error
    if plan.measurement.weighting == "kl":
        report["predicted_kl"] = plan.solution.error
        report["kl_ratio"] = report["kl"] / plan.solution.error if plan.solution.error > 0 else None
    if args.save_model:
        import lowbit

        lowbit.save(quantized, args.save_model, overwrite=args.overwrite)
        report["saved"] = str(args.save_model)
    return report


def _header(args: argparse.Namespace, summary: dict[str, Any], recipe: Path, pareto: Path, cache: Path,
            gguf: bool = False) -> list[str]:
    calib = ""
    if args.method == "gptq":  # GPTQ's result depends on the calibration data: give quantize the same
        calib = (f" --calib {args.calib} --calib-samples {args.calib_samples} --calib-seq-len {args.calib_seq_len}"
                 f" --seed {args.seed}" + (f" --calib-field {args.calib_field}" if args.calib_field != "text" else ""))
    error = (f"predicted KL {summary['predicted_error']:.5g} nats/token" if summary["weighting"] == "kl"
             else f"predicted error {summary['predicted_error']:.5g}")
    return [f"lowbit plan {args.model} (method {args.method}, weighting {args.weighting})",
            f"{summary['bits_per_weight']:.4f} bits/weight over {summary['layers']} layers, "
            f"{summary['size_bytes']} bytes in all; {error}",
            (f"apply: lowbit export {args.model} --format gguf --plan {recipe} -o OUT.gguf" if gguf else
             f"apply: lowbit quantize {args.model} --recipe {recipe} -o OUT{calib}"),
            f"Pareto front: {pareto}; measurement: {cache}"]


def _print(r: dict[str, Any]) -> None:
    unit = "KL (nats/token)" if r["weighting"] == "kl" else "error"
    print(f"planned {r['layers']} layers of {r['model']} ({r['method']}): {r['bits_per_weight']:.4f} bits/weight, "
          f"{r['size_bytes'] / 1e6:.3f} MB in all")
    print(f"  predicted {unit}: {r['predicted_error']:.5g}  (solver {r['solver']['method']}, "
          f"{'exact' if r['solver']['exact'] else 'near-exact'})")
    for spec, n in r["spec_counts"].items():
        print(f"  {n:>4} × {spec}")
    u = r.get("best_uniform")
    if u:
        print(f"  best uniform format within the budget: {u['candidate']} at {u['bits_per_weight']:.4f} bits/weight, "
              f"predicted {unit} {u['predicted_error']:.5g}")
    v = r.get("verify")
    if v:
        print(f"  verified on {v['text']}: perplexity {v['ppl']:.4f} (float {v['ppl_float']:.4f}), "
              f"KL {v['kl']:.5g} (predicted {v['predicted_error']:.5g})")
    print(f"  recipe → {r['recipe']}; front → {r['pareto']}; measurement → {r['measure_cache']}"
          f"{' (reused)' if r['cache_hit'] else ''}")
