"""Coverage-guided fuzzing with atheris (issue 21): tests/atheris_driver.py over four readers — a model's
config.json and model.safetensors (lowbit.load + a forward pass), a recipe YAML, fine-tuning JSONL — in a
subprocess each (libFuzzer exits when it is done). ``LOWBIT_FUZZ_CASES`` runs per reader: 300 in the default
suite, 10,000 in ``make fuzz``. A crash (an exception other than LowbitError, or a case over 1 s / 100 MB) fails
the test with libFuzzer's report: the traceback and the saved input (crash-<sha1> under the work directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_support import n_cases

pytest.importorskip("atheris")

RUNS = n_cases(300)
DRIVER = Path(__file__).with_name("atheris_driver.py")


@pytest.mark.parametrize("reader", ["config", "safetensors", "recipe", "train_jsonl"])
def test_atheris(reader: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.getbasetemp() / "atheris"  # seeds made once, shared by the four readers
    proc = subprocess.run([sys.executable, str(DRIVER), reader, str(work), f"-runs={RUNS}", "-seed=1",
                           "-timeout=10", "-rss_limit_mb=4096", "-print_final_stats=1"],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True, timeout=3600)
    report = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith(("[transformers]", "INFO:")))
    done = re.search(r"Done (\d+) runs in (\d+) second", report)
    assert proc.returncode == 0 and done, report[-4000:]
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", report)[-1]
    print(f"\natheris {reader}: {done[1]} runs in {done[2]} s, no crash; coverage {cov[0]} edges ({cov[1]} features) "
          f"of instrumented lowbit, corpus grew to {cov[2]} inputs")
