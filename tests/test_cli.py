"""The CLI contract: quantize/eval --json on the built-in LM and on any HF Llama directory."""

import json
from pathlib import Path

import pytest

from lowbit.cli import main


def _run_json(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["builtin:tiny-lm", "llama"])
def test_quantize_then_eval_contract(model: str, llama_dir: Path, eval_text: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    src = str(llama_dir) if model == "llama" else model
    out = tmp_path / "q4"
    q = _run_json(["quantize", src, "--method", "rtn", "--bits", "4", "--group-size", "128", "--asym",
                   "-o", str(out), "--json", "--quiet"], capsys)
    assert set(q) >= {"out", "layers_quantized", "bits_per_weight", "size_bytes", "seconds"}
    assert q["out"] == str(out) and q["layers_quantized"] > 0
    assert 4.0 <= q["bits_per_weight"] <= 4.6
    assert q["linear_weight_bytes"] <= 0.15 * 4 * q["linear_params"]
    e = _run_json(["eval", str(out), "--ppl", str(eval_text), "--json", "--quiet"], capsys)
    assert set(e) >= {"params", "size_bytes", "bits_per_weight", "ppl", "tokens"}
    assert e["bits_per_weight"] == q["bits_per_weight"] and e["size_bytes"] == q["size_bytes"]
    f = _run_json(["eval", src, "--ppl", str(eval_text), "--json", "--quiet"], capsys)
    assert f["bits_per_weight"] == 32.0 and f["params"] == e["params"] and f["tokens"] == e["tokens"]
    if model == "builtin:tiny-lm":  # a trained model: int4-g128 costs little perplexity
        assert f["ppl"] < e["ppl"] < 1.25 * f["ppl"]


def test_eval_without_text_reports_size(capsys: pytest.CaptureFixture) -> None:
    e = _run_json(["eval", "builtin:tiny-lm", "--json", "--quiet"], capsys)
    assert "ppl" not in e and e["params"] > 1_000_000 and e["bits_per_weight"] == 32.0


def test_info(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_json(["quantize", "builtin:tiny-lm", "--format", "nf4", "--double-quant",
               "-o", str(tmp_path / "q"), "--json", "--quiet"], capsys)
    info = _run_json(["info", str(tmp_path / "q"), "--json"], capsys)
    assert info["quantized"] and info["method"] == "rtn" and info["format_version"] == 1
    assert info["spec_counts"] == {"nf4-b64-dq": info["quantized_modules"]}


def test_mixed_precision_from_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    q = _run_json(["quantize", "builtin:tiny-lm", "--bits", "4", "--layer-bits", "down_proj=8",
                   "--skip", "lm_head", "--skip", r"model\.layers\.0\.self_attn\..*",
                   "-o", str(tmp_path / "q"), "--json", "--quiet"], capsys)
    info = _run_json(["info", str(tmp_path / "q"), "--json"], capsys)
    counts = info["spec_counts"]
    assert counts["int8-g128-asym"] == info["layers"] and sum(counts.values()) == q["layers_quantized"]


def test_similarity_minilm(minilm: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_json(["quantize", str(minilm), "--bits", "8", "--group-size", "0", "--sym", "-o", str(tmp_path / "q"),
               "--json", "--quiet"], capsys)
    e = _run_json(["eval", str(tmp_path / "q"), "--similarity", "--json", "--quiet"], capsys)
    assert e["cosine"] > 0.99 and e["sentences"] > 50 and e["reference"] == str(minilm)


def test_demo_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    for name in ("fp32", "int8", "int4-g128", "nf4", "perplexity", "bits/weight", "size (MB)"):
        assert name in out


def test_quantize_accepts_a_lowbit_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_json(["quantize", "builtin:tiny-lm", "--bits", "4", "-o", str(tmp_path / "q4"), "--json", "--quiet"], capsys)
    with pytest.warns(UserWarning, match="already quantized"):
        q = _run_json(["quantize", str(tmp_path / "q4"), "--bits", "8", "--group-size", "0", "-o", str(tmp_path / "q8"),
                       "--json", "--quiet"], capsys)
    info = _run_json(["info", str(tmp_path / "q8"), "--json"], capsys)
    assert info["spec_counts"] == {"int8-ch-asym": q["layers_quantized"]}
