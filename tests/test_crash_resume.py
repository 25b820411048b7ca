"""SIGKILL ``lowbit finetune`` (checkpointing every step) and ``lowbit merge`` at random moments (issue 21).

finetune: every kill is followed by ``--resume``; the adapter files are absent or complete after each kill, and
the run that finally completes writes exactly the adapter of an uninterrupted run. merge: the output is the
complete merged model or the previous one after every kill (crash_support.kill_loop)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crash_support import ENV, KILLS, digest, kill_loop, litter, run

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from lowbit.models.resolve import builtin_dir

    path = tmp_path_factory.mktemp("crash-data") / "train.txt"
    path.write_text((builtin_dir("tiny-lm") / "calib.txt").read_text()[:12000])
    return path


def _finetune(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "builtin:tiny-lm", "--data", str(data), "--steps", "24", "--batch-size", "4", "--seq-len", "64",
            "--r", "4", "--checkpoint-every", "1", "--eval-fraction", "0", "--log-every", "4", "-o", str(out), "--quiet",
            *extra]


def _adapter(out: Path) -> dict[str, str]:
    return {k: v for k, v in digest(out).items() if k in ADAPTER_FILES}


@pytest.mark.slow  # ~2 min of subprocesses; `make test-slow` and `make fuzz` run it (trainer resume equality: test_train_resume)
def test_sigkill_finetune_then_resume_equals_uninterrupted(tmp_path: Path, data_file: Path) -> None:
    ref = tmp_path / "ref"
    start = time.perf_counter()
    done = run(_finetune(data_file, ref))
    duration = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    reference = _adapter(ref)
    assert set(reference) == set(ADAPTER_FILES)
    out = tmp_path / "run"
    rng = random.Random(3)
    kills = partial = 0
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-m", "lowbit", *_finetune(data_file, out, "--resume")], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.3, 1.1 * duration))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        kills += 1
        got = _adapter(out) if out.exists() else {}
        assert got in ({}, reference), f"after a kill the adapter is partial: {sorted(got)}"  # absent or complete
        partial += not got
    final = run(_finetune(data_file, out, "--resume"))
    assert final.returncode == 0, final.stderr[-2000:]
    assert _adapter(out) == reference  # resumed across every kill: the same adapter, bit for bit
    assert litter(out) == [] and not [p for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    print(f"finetune: {kills} kills, adapter absent after {partial}, resumed to the uninterrupted result")


def test_sigkill_merge(tmp_path: Path, data_file: Path) -> None:
    adapter = tmp_path / "adapter"
    done = run(_finetune(data_file, adapter))
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "merged"
    seen = kill_loop(["merge", "builtin:tiny-lm", str(adapter), "-o", str(out), "--merge-dtype", "float32",
                      "--overwrite", "--quiet"], out, seed=4)
    print("merge kills:", seen)
