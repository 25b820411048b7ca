"""lowbit prune: magnitude, Wanda, SparseGPT and N:M masks — exact patterns, the error ordering, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.compress.prune import (PruneConfig, magnitude_prune, nm_mask, parse_nm, prune_model, row_mask,
                                   sparsegpt_prune, wanda_prune)
from lowbit.errors import InvalidSpecError, ShapeError


def _layer(seed: int = 0, n: int = 48, k: int = 64, rows: int = 512):
    """A weight and correlated inputs whose features have very different scales (where data-aware pruning wins)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]  # mixed within every group of inputs
    x = (torch.randn(rows, k, generator=g) @ mix) * scales
    return w, x


def _output_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - pruned).t()) ** 2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4), (4, 8)])
def test_patterns_are_exact(nm):
    w, x = _layer()
    config = PruneConfig("sparsegpt", 0.5, nm)
    hessian = 2 * x.t() @ x / x.shape[0]
    for pruned in (magnitude_prune(w, config), wanda_prune(w, (x ** 2).sum(0), config),
                   sparsegpt_prune(w, hessian, config)):
        zero = pruned == 0
        if nm is None:
            assert int(zero.sum()) == pytest.approx(0.5 * w.numel(), abs=w.shape[0])
        else:
            n, m = nm
            assert torch.all(zero.reshape(w.shape[0], -1, m).sum(-1) == n)  # every group of m: exactly n zeros
    assert torch.all(row_mask(w.abs(), 0.25).sum(1) == 16)  # Wanda's per-row budget
    assert torch.equal(nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4), torch.tensor([[False, True, False, True]]))


def test_magnitude_keeps_the_largest_weights():
    w, _ = _layer()
    pruned = magnitude_prune(w, PruneConfig("magnitude", 0.75))
    kept = w.abs()[pruned != 0]
    dropped = w.abs()[pruned == 0]
    assert int((pruned == 0).sum()) == 0.75 * w.numel() and kept.min() >= dropped.max()
    assert torch.equal(pruned[pruned != 0], w[pruned != 0])


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_below_wanda_below_magnitude_on_the_layer_output(nm):
    w, x = _layer(1)
    config = PruneConfig("sparsegpt", 0.5, nm)
    hessian = 2 * x.t() @ x / x.shape[0]
    errors = {"magnitude": _output_error(w, magnitude_prune(w, config), x),
              "wanda": _output_error(w, wanda_prune(w, (x ** 2).sum(0), config), x),
              "sparsegpt": _output_error(w, sparsegpt_prune(w, hessian, config), x)}
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] < 0.9 * errors["magnitude"], errors


def test_config_errors():
    assert parse_nm("2:4") == (2, 4) and PruneConfig("nm").nm == (2, 4) and PruneConfig(nm=(1, 4)).sparsity == 0.25
    for bad in ("2-4", "a:4", "4"):
        with pytest.raises(InvalidSpecError, match="N:M"):
            parse_nm(bad)
    with pytest.raises(InvalidSpecError, match="0 < N < M"):
        PruneConfig(nm=(4, 2))
    with pytest.raises(InvalidSpecError, match="between 0 and 1"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(InvalidSpecError, match="prune method"):
        PruneConfig("obs")
    with pytest.raises(ShapeError, match="multiple of 8"):
        magnitude_prune(torch.randn(4, 12), PruneConfig(nm=(2, 8)))


def test_built_in_lm_at_half_sparsity():
    """50 % unstructured: SparseGPT and Wanda clearly below magnitude (Wanda's README ordering on Llama-2-7B)."""
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.eval.perplexity import perplexity, read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    tok = load_tokenizer(lowbit.load("builtin:tiny-lm"))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))[:4096]
    ppl = {"dense": perplexity(lowbit.load("builtin:tiny-lm"), ids).ppl}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = lowbit.load("builtin:tiny-lm")
        result = prune_model(model, PruneConfig(method, 0.5), tokenizer=tok, calib=CalibConfig(samples=16, seq_len=128))
        assert len(result.layers) == 28 and abs(result.sparsity - 0.5) < 1e-3
        ppl[method] = perplexity(model, ids).ppl
    assert ppl["dense"] < min(ppl["sparsegpt"], ppl["wanda"]) and max(ppl["sparsegpt"], ppl["wanda"]) < 0.97 * ppl[
        "magnitude"], ppl


def test_cli_prunes_saves_and_loads(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", "builtin:tiny-lm", "--method", "nm", "-o", str(out), "--calib-samples", "8",
                 "--calib-seq-len", "64", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["nm"] == "2:4" and report["sparsity"] == 0.5 and report["layers_pruned"] == 28
    assert set(report) >= {"out", "method", "sparsity", "zeros", "pruned_params", "per_layer", "seconds"}
    model = lowbit.load(out)
    w = model.model.layers[2].mlp.down_proj.weight
    assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2)
    assert not (model.lm_head.weight == 0).any()  # the output head (tied embedding) is not pruned
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[0, 5, 17, 300]])
    torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits)
    assert main(["prune", "builtin:tiny-lm", "-o", str(out), "--method", "magnitude", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["prune", "builtin:tiny-lm", "-o", str(tmp_path / "x"), "--nm", "3:2", "--quiet"]) == 2
    assert "0 < N < M" in capsys.readouterr().err and not (tmp_path / "x").exists()
    q = tmp_path / "q"
    assert main(["quantize", "builtin:tiny-lm", "-o", str(q), "--quiet"]) == 0
    assert main(["prune", str(q), "-o", str(tmp_path / "y"), "--method", "magnitude", "--quiet"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_joint_sparsegpt_quantization_keeps_zeros_and_beats_prune_then_round():
    """SparseGPT + int4 in one pass (the paper's joint mode): a packed model, ≥ 50 % exact zeros in every layer,
    and on the layer output below pruning first and rounding the survivors afterwards."""
    from lowbit.formats.spec import QuantSpec
    from lowbit.tensor import QuantizedWeight

    w, x = _layer(2)
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    hessian = 2 * x.t() @ x / x.shape[0]
    joint = sparsegpt_prune(w, hessian, PruneConfig("sparsegpt", 0.5, quant=spec))
    assert isinstance(joint, QuantizedWeight) and joint.spec == spec
    deq = joint.dequantize()
    assert (deq == 0).float().mean() >= 0.5
    then_round = QuantizedWeight.from_float(sparsegpt_prune(w, hessian, PruneConfig("sparsegpt", 0.5)), spec).dequantize()
    assert (then_round == 0).float().mean() >= 0.5  # rounding keeps zeros too (code z) …
    assert _output_error(w, deq, x) < 0.9 * _output_error(w, then_round, x)  # … but loses more
    with pytest.raises(InvalidSpecError, match="joint"):
        PruneConfig("wanda", quant=spec)


def test_cli_joint_prune_quantize(tmp_path, capsys):
    from lowbit.nn.quant_linear import QuantLinear

    out = tmp_path / "sq"
    assert main(["prune", "builtin:tiny-lm", "--method", "sparsegpt", "--bits", "4", "--group-size", "64",
                 "--calib-samples", "4", "--calib-seq-len", "64", "-o", str(out), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["quantized"] == "int4-g64-asym" and report["sparsity"] >= 0.5
    layer = lowbit.load(out).model.layers[2].self_attn.o_proj
    assert isinstance(layer, QuantLinear) and (layer.weight.dequantize() == 0).float().mean() >= 0.5
