"""GPTQ of a model whose float weights exceed the memory cap: blocks are read from disk one at a time."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.models.resolve import builtin_dir
from lowbit.models.synthetic import LlamaShape, write_random_llama

WRAPPER = ("import resource, subprocess, sys, json\n"
           "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "print(json.dumps({'rc': p.returncode, 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,"
           " 'out': p.stdout[-2000:], 'err': p.stderr[-3000:]}))\n")


def _peak(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, check=True,
                          timeout=900)
    return json.loads(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via getrusage is measured on Linux")
def test_gptq_peak_memory_under_cap(tmp_path: Path) -> None:
    shape = LlamaShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=4096)
    model = write_random_llama(tmp_path / "m", shape, max_shard_bytes=128 << 20)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_dir("tiny-lm") / name, model / name)
    fp32 = shape.num_params() * 4
    baseline = _peak([sys.executable, "-c", "import torch, transformers, lowbit.cli, lowbit.algorithms.ptq"])["rss"]
    cap = fp32 // 2  # working memory allowed: half of the float weights
    r = _peak([sys.executable, "-m", "lowbit.cli", "quantize", str(model), "--method", "gptq", "--bits", "4",
               "--group-size", "128", "--calib-samples", "8", "--calib-seq-len", "128", "-o", str(tmp_path / "q"),
               "--json", "--quiet"])
    assert r["rc"] == 0, r["err"]
    summary = json.loads(r["out"].strip().splitlines()[-1])
    assert summary["layers_quantized"] == 7 * shape.num_hidden_layers
    assert r["rss"] - baseline < cap < fp32, (r["rss"], baseline, cap, fp32)
