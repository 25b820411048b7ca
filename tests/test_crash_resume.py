"""SIGKILL ``lowbit finetune`` (checkpointing every step) and ``lowbit merge`` at random moments (issue 21).

finetune: every kill is followed by ``--resume``; the adapter files are absent or complete after each kill, and
the run that finally completes writes exactly the adapter of an uninterrupted run. merge: the output is the
complete merged model or the previous one after every kill (crash_support.kill_loop)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from crash_support import KILLS, Forker, digest, kill_loop, litter, run

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


def test_sigkill_finetune_then_resume_equals_uninterrupted(tmp_path: Path, data_file: Path) -> None:
    ref = tmp_path / "ref"
    done = run(_finetune(data_file, ref))
    assert done.returncode == 0, done.stderr[-2000:]
    reference = _adapter(ref)
    assert set(reference) == set(ADAPTER_FILES)
    out = tmp_path / "run"
    rng = random.Random(3)
    kills = partial = 0
    with Forker(warm=["info", "builtin:tiny-lm"]) as forker:
        start = time.perf_counter()
        assert forker.wait(forker.start(_finetune(data_file, tmp_path / "timed"))) == 0
        duration = time.perf_counter() - start
        for _ in range(KILLS):
            pid = forker.start(_finetune(data_file, out, "--resume"))
            time.sleep(rng.uniform(0.0, 1.1 * duration))
            forker.kill(pid)
            kills += 1
            got = _adapter(out) if out.exists() else {}
            assert got in ({}, reference), f"after a kill the adapter is partial: {sorted(got)}"  # absent or complete
            partial += not got
    assert _adapter(tmp_path / "timed") == reference  # a forked run writes what a fresh process writes
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
                      "--overwrite", "--no-ppl", "--quiet"], out, seed=4, warm=["info", "builtin:tiny-lm"])
    print("merge kills:", seen)
