"""lowbit plan: candidate names, the exact solver (vs brute force), plan → recipe → quantize on the built-in LM."""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from lowbit.errors import InvalidSpecError, OutputExistsError
from lowbit.plan.measure import DEFAULT_CANDIDATES, Measurement, parse_candidates, parse_spec_name
from lowbit.plan.solve import pareto_hull, solve_budget, solve_error_bound

# the built-in LM's plan runs on a small calibration set so the module stays well under a minute
CALIB = ["--calib-samples", "16", "--calib-seq-len", "128", "--kl-samples", "4"]


# ---- candidate names ----------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(DEFAULT_CANDIDATES))
def test_default_candidates_round_trip_their_names(method: str) -> None:
    specs = parse_candidates(None, method)
    assert 10 <= len(specs) <= 14
    assert [s.describe() for s in specs] == list(DEFAULT_CANDIDATES[method])
    for spec in specs:
        assert parse_spec_name(spec.describe()) == spec


def test_candidate_errors() -> None:
    with pytest.raises(InvalidSpecError, match="unknown format"):
        parse_spec_name("int4x-g32")
    with pytest.raises(InvalidSpecError, match="cannot read"):
        parse_spec_name("int4-q32")
    with pytest.raises(InvalidSpecError, match="GPTQ"):
        parse_candidates("int4-g128-asym,nf4-b64", "gptq")
    with pytest.raises(InvalidSpecError, match="HQQ"):
        parse_candidates("int4-g128-sym", "hqq")
    assert parse_spec_name("fp8").describe() == "fp8_e4m3-ch"
    assert parse_spec_name("int4-g128-asym-fz").zero_dtype == "float16"


# ---- solver -------------------------------------------------------------------------------
def _instance(seed: int, layers: int = 5, cands: int = 4) -> tuple[list[list[int | None]], list[list[float | None]]]:
    rng = random.Random(seed)
    costs: list[list[int | None]] = []
    errors: list[list[float | None]] = []
    for _ in range(layers):
        c = sorted(rng.sample(range(8, 200, 4), cands))
        e = sorted((rng.random() for _ in range(cands)), reverse=True)
        if rng.random() < 0.5:  # not every cost-ordered candidate is better (dominated ones must be dropped)
            i, j = rng.sample(range(cands), 2)
            e[i], e[j] = e[j], e[i]
        if rng.random() < 0.3:  # a candidate that does not fit this layer
            k = rng.randrange(1, cands)
            c[k], e[k] = None, None
        costs.append(c)
        errors.append(e)
    return costs, errors


def _brute(costs, errors):
    rows = [[k for k in range(len(c)) if c[k] is not None] for c in costs]
    for choice in itertools.product(*rows):
        yield (list(choice), sum(costs[i][k] for i, k in enumerate(choice)),
               sum(errors[i][k] for i, k in enumerate(choice)))


@pytest.mark.parametrize("seed", range(40))
def test_solver_is_exact_against_brute_force(seed: int) -> None:
    costs, errors = _instance(seed)
    every = list(_brute(costs, errors))
    lo, hi = min(c for _, c, _ in every), max(c for _, c, _ in every)
    rng = random.Random(1000 + seed)
    for budget in [lo, hi, *(rng.randint(lo, hi) for _ in range(5))]:
        best = min(e for _, c, e in every if c <= budget)
        s = solve_budget(costs, errors, budget)
        assert s.exact and s.cost <= budget and s.error == pytest.approx(best, abs=1e-12)
        assert s.lower_bound is not None and s.lower_bound <= s.error + 1e-12
        # a coarse cost grid (what very large models get) stays feasible and never loses to the hull
        coarse = solve_budget(costs, errors, budget, max_cells=4)
        assert coarse.cost <= budget and best - 1e-12 <= coarse.error <= s.lower_bound + (
            max(max(e for e in row if e is not None) for row in errors))
        hull_best = min(p.error for p in pareto_hull(costs, errors) if p.cost <= budget)
        assert coarse.error <= hull_best + 1e-12
    errs = sorted(e for _, _, e in every)
    for bound in (errs[0], errs[len(errs) // 3], errs[-1]):
        cheapest = min(c for _, c, e in every if e <= bound)
        s = solve_error_bound(costs, errors, bound)
        assert s.exact and s.error <= bound * (1 + 1e-12) and s.cost == cheapest


def test_pareto_hull_vertices_are_optimal_and_monotone() -> None:
    costs, errors = _instance(7, layers=6)
    every = list(_brute(costs, errors))
    front = pareto_hull(costs, errors)
    assert len(front) >= 2
    for a, b in zip(front, front[1:]):
        assert a.cost < b.cost and a.error > b.error
    for p in front:  # every hull vertex is optimal at its own size
        assert p.error == pytest.approx(min(e for _, c, e in every if c <= p.cost), abs=1e-12)
    slopes = [(a.error - b.error) / (b.cost - a.cost) for a, b in zip(front, front[1:])]
    assert all(s1 >= s2 - 1e-12 for s1, s2 in zip(slopes, slopes[1:]))  # convex


def test_solver_errors_and_determinism() -> None:
    costs, errors = _instance(3)
    with pytest.raises(InvalidSpecError, match="below the smallest plan"):
        solve_budget(costs, errors, 1)
    with pytest.raises(InvalidSpecError, match="below the least predicted error"):
        solve_error_bound(costs, errors, -1.0)
    ties = [[10, 20], [10, 20], [10, 20]], [[1.0, 0.5], [1.0, 0.5], [1.0, 0.5]]
    picks = {tuple(solve_budget(*ties, 40).choices) for _ in range(3)}
    assert len(picks) == 1 and sum(next(iter(picks))) == 1  # equal layers: one upgrade, the same one every time
    costs, errors = _instance(11, layers=40, cands=8)  # bigger than brute force reaches: same answer twice
    first = solve_budget(costs, errors, 2500)
    second = solve_budget([list(r) for r in costs], [list(r) for r in errors], 2500)
    assert first.choices == second.choices and first.exact


# ---- the built-in LM, through the command line --------------------------------------------
def _plan_cli(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    from lowbit import cli

    if "plan" in getattr(cli, "COMMANDS", {}):
        assert cli.main(["plan", *argv]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from lowbit.cli import plan as plan_cli

    parser = argparse.ArgumentParser(prog="lowbit")
    plan_cli.add_parser(parser.add_subparsers(dest="command"), cli._common)
    return plan_cli.cmd_plan(parser.parse_args(["plan", *argv]))


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `lowbit plan --target-bpw 3.5 --verify --save-model` run on the built-in LM (RTN candidates)."""
    root = tmp_path_factory.mktemp("plan")
    from lowbit.cli import _common
    from lowbit.cli import plan as plan_cli

    parser = argparse.ArgumentParser(prog="lowbit")
    plan_cli.add_parser(parser.add_subparsers(dest="command"), _common)
    argv = ["plan", "builtin:tiny-lm", "--target-bpw", "3.5", "-o", str(root / "plan.yaml"), "--verify",
            "--save-model", str(root / "verified"), "--json", "--quiet", *CALIB]
    result = plan_cli.cmd_plan(parser.parse_args(argv))
    return {"root": root, "result": result, "parser": parser, "argv": argv}


def test_plan_outputs_and_budget(planned: dict) -> None:
    r, root = planned["result"], planned["root"]
    assert set(r) >= {"recipe", "pareto", "measure_cache", "cache_hit", "bits_per_weight", "size_bytes",
                      "predicted_error", "predicted_kl", "solver", "spec_counts", "best_uniform", "verify"}
    assert not r["cache_hit"] and r["solver"]["exact"] and r["layers"] == 29  # 28 + the tied head
    assert 3.4 < r["bits_per_weight"] <= 3.5  # budget respected, and (nearly) used
    assert r["predicted_error"] < r["best_uniform"]["predicted_error"]
    assert len(r["spec_counts"]) >= 2  # mixed precision
    v = r["verify"]
    assert v["bits_per_weight"] == pytest.approx(r["bits_per_weight"]) and v["size_bytes"] == r["size_bytes"]
    assert v["ppl_float"] < v["ppl"] and 0.5 < v["kl"] / v["predicted_kl"] < 2.0  # the prediction is in scale
    front = json.loads(Path(r["pareto"]).read_text())
    assert front["format"] == "lowbit-plan-pareto" and front["verify"]["ppl"] == v["ppl"]
    points = front["front"]
    assert len(points) > 10 and all(len(p["choices"]) == 29 for p in points)
    assert all(a["size_bytes"] < b["size_bytes"] and a["predicted_error"] > b["predicted_error"]
               for a, b in zip(points, points[1:]))
    m = Measurement.load(r["measure_cache"])
    assert m.provenance["calib"]["samples"] == 16 and m.provenance["lowbit_version"]
    assert all(layer.sensitivity > 0 and layer.reference is not None for layer in m.layers)
    text = (root / "plan.yaml").read_text()
    assert text.startswith("# lowbit plan builtin:tiny-lm") and "lowbit quantize builtin:tiny-lm --recipe" in text
    assert "tied_head: share" in text and "pattern: lm_head" in text  # the tied embedding/head is planned, shared


def test_planned_model_beats_best_uniform_format_that_fits(planned: dict) -> None:
    """At 3.5 bits/weight the plan's perplexity is below every uniform candidate of ≤ 3.5 bits/weight (applied to
    the same layers: the blocks and the tied embedding/head, shared)."""
    import lowbit
    from lowbit.plan.planner import quantized_bits_per_weight
    from lowbit.recipe import LayerOverride, QuantRecipe
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
    from lowbit.eval.size import model_size
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    r = planned["result"]
    m = Measurement.load(r["measure_cache"])
    planned_model = lowbit.load(planned["root"] / "verified")
    ids = tokenize_text(load_tokenizer(planned_model), read_text(builtin_dir("tiny-lm") / "eval.txt"))
    ppl_planned = perplexity(planned_model, ids).ppl
    assert ppl_planned == pytest.approx(r["verify"]["ppl"], rel=1e-5)  # kl_divergence sums per window
    uniform = {}
    for k, spec in enumerate(m.candidates):
        if 8 * sum(layer.nbytes[k] for layer in m.layers) / m.numel > 3.5:
            continue
        recipe = QuantRecipe(spec, overrides=(LayerOverride("lm_head", spec),), tied_head="share")
        model = lowbit.quantize(lowbit.load("builtin:tiny-lm"), recipe)
        assert quantized_bits_per_weight(model) <= 3.5 and model_size(model).size_bytes <= r["size_bytes"]
        uniform[spec.describe()] = perplexity(model, ids).ppl
    assert {"int3-g32-asym-dq", "int3-g64-asym-dq", "int2-g32-asym-dq"} <= set(uniform)
    assert ppl_planned < min(uniform.values()), (ppl_planned, uniform)


def test_recipe_round_trip_reproduces_the_model(planned: dict, capsys: pytest.CaptureFixture) -> None:
    """`lowbit quantize --recipe` gives tensor for tensor the model plan verified."""
    from safetensors.torch import load_file

    from lowbit.cli import main

    root = planned["root"]
    assert main(["quantize", "builtin:tiny-lm", "--recipe", str(root / "plan.yaml"), "-o", str(root / "q"),
                 "--json", "--quiet"]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert q["size_bytes"] == planned["result"]["size_bytes"]
    ours, theirs = _tensors(root / "verified", load_file), _tensors(root / "q", load_file)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    specs = json.loads((root / "q" / "config.json").read_text())["quantization_config"]
    saved = json.loads((root / "verified" / "config.json").read_text())["quantization_config"]
    assert specs["modules"] == saved["modules"] and specs["default_spec"] == saved["default_spec"]


def _tensors(directory: Path, load_file) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_cache_reuse_determinism_and_bounds(planned: dict) -> None:
    root, parser = planned["root"], planned["parser"]
    from lowbit.cli import plan as plan_cli

    base = ["plan", "builtin:tiny-lm", "--json", "--quiet", *CALIB, "--measure-cache", str(root / "plan.measure.json")]
    again = plan_cli.cmd_plan(parser.parse_args([*base, "--target-bpw", "3.5", "-o", str(root / "again.yaml")]))
    assert again["cache_hit"]
    assert (root / "again.yaml").read_text().split("\n", 4)[4] == (root / "plan.yaml").read_text().split("\n", 4)[4]
    with pytest.raises(OutputExistsError):
        plan_cli.cmd_plan(parser.parse_args([*base, "--target-bpw", "3.5", "-o", str(root / "again.yaml")]))
    bound = again["predicted_error"] * 1.5  # smallest plan within a KL bound
    small = plan_cli.cmd_plan(parser.parse_args([*base, "--max-kl", str(bound), "-o", str(root / "kl.yaml")]))
    assert small["predicted_error"] <= bound and small["bits_per_weight"] < again["bits_per_weight"]
    size = again["size_bytes"]  # a whole-model byte budget equal to the 3.5-bit plan's size gives the same plan
    same = plan_cli.cmd_plan(parser.parse_args([*base, "--budget", str(size), "-o", str(root / "b.yaml")]))
    assert same["size_bytes"] <= size and same["predicted_error"] == pytest.approx(again["predicted_error"])
    with pytest.raises(InvalidSpecError, match="float parts"):
        plan_cli.cmd_plan(parser.parse_args([*base, "--budget", "5KB", "-o", str(root / "c.yaml")]))


def test_measurement_is_deterministic(planned: dict) -> None:
    """Measuring again from scratch gives the same numbers (and so the same plan)."""
    root, parser = planned["root"], planned["parser"]
    from lowbit.cli import plan as plan_cli

    fresh = plan_cli.cmd_plan(parser.parse_args(
        ["plan", "builtin:tiny-lm", "--json", "--quiet", *CALIB, "--target-bpw", "3.5", "--remeasure",
         "-o", str(root / "fresh.yaml")]))
    assert not fresh["cache_hit"]
    a = json.loads(Path(planned["result"]["measure_cache"]).read_text())
    b = json.loads(Path(fresh["measure_cache"]).read_text())
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert (root / "fresh.yaml").read_text().split("\n", 4)[4] == (root / "plan.yaml").read_text().split("\n", 4)[4]


@pytest.mark.slow
def test_gptq_plan_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """GPTQ plans: the verified model equals `lowbit quantize --recipe` with the same calibration flags."""
    from safetensors.torch import load_file

    from lowbit.cli import main

    calib = ["--calib-samples", "16", "--calib-seq-len", "128"]
    r = _plan_cli(["builtin:tiny-lm", "--method", "gptq", "--candidates", "int2-g64-asym,int3-g64-asym,int4-g128-asym",
                   "--target-bpw", "3.5", "-o", str(tmp_path / "p.yaml"), "--verify", "--save-model",
                   str(tmp_path / "v"), "--kl-samples", "4", "--json", "--quiet", *calib], capsys)
    assert r["bits_per_weight"] <= 3.5 and r["verify"]["ppl"] < 40
    assert main(["quantize", "builtin:tiny-lm", "--recipe", str(tmp_path / "p.yaml"), "-o", str(tmp_path / "q"),
                 "--json", "--quiet", *calib]) == 0
    ours, theirs = _tensors(tmp_path / "v", load_file), _tensors(tmp_path / "q", load_file)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_plan_api_on_a_conv1d_model(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers ([in, out] weights): measured, weighted, planned and reproduced by the recipe."""
    from conftest import make_tiny_gpt2

    import lowbit
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.nn.quant_linear import QuantLinear
    from lowbit.plan import make_plan, measure_model
    from lowbit.quantize import load_tokenizer

    path = make_tiny_gpt2(tmp_path / "gpt2")
    model = lowbit.load(path)
    candidates = parse_candidates("int2-g64-asym,int4-g64-asym,int8-ch-sym", "rtn")
    m, hit = measure_model(model, load_tokenizer(model), str(path), candidates=candidates,
                           calib=CalibConfig(samples=4, seq_len=64), kl_samples=2, cache=tmp_path / "m.json")
    assert not hit and len(m.layers) == 9 and all(layer.sensitivity > 0 for layer in m.layers)
    assert m.layers[-1].name == "lm_head" and m.provenance["tied_head"] == "lm_head"
    no_head, _ = measure_model(model, load_tokenizer(model), str(path), candidates=candidates, head=False,
                               calib=CalibConfig(samples=4, seq_len=64), kl_samples=2, weighting="relative")
    assert [layer.name for layer in no_head.layers] == [layer.name for layer in m.layers[:-1]]
    assert no_head.float_bytes - m.float_bytes == 4 * m.layers[-1].numel  # the float32 embedding is budgeted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seq, _ = measure_model(model, load_tokenizer(model), str(path), candidates=candidates, inputs="reference",
                           calib=CalibConfig(samples=4, seq_len=64), kl_samples=2)
    assert seq.provenance["inputs"] == "reference" and "inputs" not in m.provenance
    assert seq.layers[0].rel_error == pytest.approx(m.layers[0].rel_error)  # block 0 sees the same inputs
    assert seq.layers[4].rel_error != pytest.approx(m.layers[4].rel_error)  # block 1 sees block 0 quantized
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # float weights put back
    tokenizer = load_tokenizer(model)
    again, hit = measure_model(model, tokenizer, str(path), candidates=candidates,
                               calib=CalibConfig(samples=4, seq_len=64), kl_samples=2, cache=tmp_path / "m.json")
    assert hit and again.to_dict() == m.to_dict()
    other, hit = measure_model(model, tokenizer, str(path), candidates=candidates[:2],  # other candidates: measured
                               calib=CalibConfig(samples=4, seq_len=64), kl_samples=2, cache=tmp_path / "m.json")
    assert not hit and len(other.candidates) == 2
    (tmp_path / "m.json").write_text("{not json")  # a broken cache is measured again, not an error
    assert not measure_model(model, tokenizer, str(path), candidates=candidates[:2], calib=CalibConfig(samples=4,
                             seq_len=64), kl_samples=2, cache=tmp_path / "m.json")[1]
    plan = make_plan(m, target_bpw=4.0)
    assert plan.solution.cost * 8 <= 4.0 * m.numel
    quantized = lowbit.quantize(lowbit.load(path), plan.recipe)
    got = {n: mod.spec for n, mod in quantized.named_modules() if isinstance(mod, QuantLinear)}
    assert got == plan.layer_specs
    assert sum(mod.weight.nbytes for mod in quantized.modules() if isinstance(mod, QuantLinear)) == plan.solution.cost


# ---- GGUF block types as candidates: plan → lowbit export --plan → llama.cpp ---------------------
def test_gguf_candidate_names_and_errors(tmp_path: Path) -> None:
    from lowbit.plan.measure import GGUFCandidate, candidate_from_dict
    from lowbit.plan.recipe_out import read_gguf_plan, write_gguf_plan

    cands = parse_candidates("q4_k, Q6_K,q8_0", "rtn")
    assert cands == [GGUFCandidate("Q4_K"), GGUFCandidate("Q6_K"), GGUFCandidate("Q8_0")]
    assert [candidate_from_dict(c.to_dict(), "x") for c in cands] == cands
    with pytest.raises(InvalidSpecError, match="mix GGUF block types and lowbit formats"):
        parse_candidates("q4_k,int4-g32-asym", "rtn")
    with pytest.raises(InvalidSpecError, match="--method rtn"):
        parse_candidates("q4_k,q6_k", "gptq")
    types = {"model.layers.0.mlp.down_proj": "q6_k", "lm_head": "q4_k"}
    assert read_gguf_plan(write_gguf_plan(types, tmp_path / "p.yaml", ["a comment"])) == types
    (tmp_path / "r.yaml").write_text("default: {format: int}\nmethod: rtn\n")
    with pytest.raises(InvalidSpecError, match="lowbit quantize --recipe"):
        read_gguf_plan(tmp_path / "r.yaml")
    (tmp_path / "bad.yaml").write_text("format: lowbit-gguf-plan\ntensor_types: {lm_head: q7_k}\n")
    with pytest.raises(InvalidSpecError, match="not a GGUF block type"):
        read_gguf_plan(tmp_path / "bad.yaml")


def test_gguf_plan_exports_and_runs_in_llama_cpp(llama_cpp_module, tmp_path: Path, capsys) -> None:
    """A plan over GGUF types is written as per-tensor types; `lowbit export --plan` writes exactly those
    (the tied head as token_embd), and llama.cpp's perplexity matches the plan's verification."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_support import gguf_tensor_types, llama_cpp_ppl, open_llama, token_windows
    from lowbit.cli import main
    from lowbit.eval.perplexity import read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.plan.recipe_out import read_gguf_plan

    r = _plan_cli(["builtin:tiny-lm", "--candidates", "q4_k,q5_k,q6_k,q8_0", "--target-bpw", "5.0", "-o",
                   str(tmp_path / "g.yaml"), "--verify", "--json", "--quiet", *CALIB], capsys)
    assert 4.8 < r["bits_per_weight"] <= 5.0 and r["verify"]["size_bytes"] == r["size_bytes"]
    types = read_gguf_plan(tmp_path / "g.yaml")
    assert len(types) == 29 and "lm_head" in types and len(set(types.values())) >= 2
    assert "lowbit export builtin:tiny-lm --format gguf --plan" in (tmp_path / "g.yaml").read_text()
    assert main(["export", "builtin:tiny-lm", "--format", "gguf", "--plan", str(tmp_path / "g.yaml"), "-o",
                 str(tmp_path / "g.gguf"), "--json", "--quiet"]) == 0
    written = gguf_tensor_types(tmp_path / "g.gguf")
    assert written["token_embd.weight"] == types["lm_head"].upper() and "output.weight" not in written
    assert written["blk.3.ffn_down.weight"] == types["model.layers.3.mlp.down_proj"].upper()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_dir("tiny-lm")))
    windows = token_windows(tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt")), 256)
    theirs = llama_cpp_ppl(open_llama(llama_cpp_module, tmp_path / "g.gguf", 256), windows)
    assert abs(theirs / r["verify"]["ppl"] - 1) < 0.01, (theirs, r["verify"]["ppl"])
    from lowbit.io.gguf.writer import export_gguf

    with pytest.raises(InvalidSpecError, match="float type"):
        export_gguf("builtin:tiny-lm", tmp_path / "f.gguf", type="f16", tensor_plan=types, show_progress=False)
    with pytest.raises(InvalidSpecError, match="not a module of this model"):
        export_gguf("builtin:tiny-lm", tmp_path / "x.gguf", tensor_plan={"model.layers.9.mlp.up_proj": "q4_k"},
                    show_progress=False)
