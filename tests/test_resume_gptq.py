"""GPTQ and AWQ runs resume after a kill from the last finished block, with the same result as an uninterrupted
run (issue 21): in process (a checkpoint cut back to its first blocks), for real (SIGKILL of `lowbit quantize`
once two blocks are saved, then the same command again), and killed again and again at random moments, each run
resuming what the killed ones finished."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.calib_data import CalibConfig
from lowbit.algorithms.ptq import quantize_calibrated
from lowbit.formats.spec import QuantSpec
from lowbit.quantize import load_tokenizer
from lowbit.recipe import QuantRecipe

from crash_support import ENV, KILLS, Forker, digest, run

CALIB = CalibConfig(samples=4, seq_len=64)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_resumed_run_equals_uninterrupted(tmp_path: Path, method: str) -> None:
    recipe = QuantRecipe(QuantSpec(bits=4, group_size=64, symmetric=False), method)
    tok = load_tokenizer(lowbit.load("builtin:tiny-lm"))
    ck = tmp_path / "ck"
    whole = quantize_calibrated(lowbit.load("builtin:tiny-lm"), recipe, tok, CALIB, show_progress=False,
                                checkpoint_dir=ck)
    state = json.loads((ck / "state.json").read_text())
    assert sorted(state["blocks"]) == ["0", "1", "2", "3"]
    state["blocks"] = {k: v for k, v in state["blocks"].items() if k in ("0", "1")}  # as if killed in block 2
    (ck / "state.json").write_text(json.dumps(state))
    (ck / "block-2.safetensors").unlink()
    resumed = quantize_calibrated(lowbit.load("builtin:tiny-lm"), recipe, tok, CALIB, show_progress=False,
                                  checkpoint_dir=ck)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # another recipe finds a checkpoint that is not its own: ignored and replaced, never mixed in
    other = QuantRecipe(QuantSpec(bits=3, group_size=64, symmetric=False), method)
    quantize_calibrated(lowbit.load("builtin:tiny-lm"), other, tok, CALIB, show_progress=False, checkpoint_dir=ck)
    assert json.loads((ck / "state.json").read_text())["fingerprint"] != state["fingerprint"]


@pytest.mark.slow  # three GPTQ runs in subprocesses; the in-process resume test above is the default-suite share
def test_sigkill_gptq_then_rerun_resumes(tmp_path: Path) -> None:
    argv = ["quantize", "builtin:tiny-lm", "--method", "gptq", "--calib-samples", "4", "--calib-seq-len", "64"]
    ref = tmp_path / "ref"
    assert run([*argv, "-o", str(ref), "--quiet"]).returncode == 0
    out = tmp_path / "out"
    state = tmp_path / ".out.resume" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", *argv, "-o", str(out), "--quiet"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(state.read_text())["blocks"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(json.loads(state.read_text())["blocks"]) >= 2
    again = subprocess.run([sys.executable, "-m", "lowbit", *argv, "-o", str(out)], env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming gptq after block" in again.stderr
    assert digest(out) == digest(ref)  # the same files, bit for bit
    assert not state.parent.exists()  # the checkpoint is gone once the output is written


@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_sigkill_repeatedly_then_resume(tmp_path: Path, method: str) -> None:
    """KILLS runs of the same command, each SIGKILLed at a random moment: the resume state only grows, the output
    is absent until a run completes, and the run that completes writes the uninterrupted result, bit for bit."""
    argv = ["quantize", "builtin:tiny-lm", "--method", method, "--calib-samples", "4", "--calib-seq-len", "64"]
    ref = tmp_path / "ref"
    done = run([*argv, "-o", str(ref), "--quiet"])
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    state = tmp_path / ".out.resume" / "state.json"

    def finished_blocks() -> int:
        try:
            return len(json.loads(state.read_text())["blocks"])
        except FileNotFoundError:
            return 0
    rng = random.Random(5)
    rounds: list[list[int]] = [[]]  # finished blocks after each kill, per sequence of resumed runs
    with Forker(warm=["info", "builtin:tiny-lm"]) as forker:
        start = time.perf_counter()
        assert forker.wait(forker.start([*argv, "-o", str(tmp_path / "timed"), "--quiet"])) == 0
        duration = time.perf_counter() - start
        assert digest(tmp_path / "timed") == digest(ref)
        for _ in range(KILLS):
            pid = forker.start([*argv, "-o", str(out), "--quiet"])
            time.sleep(rng.uniform(0.0, 0.8 * duration))
            forker.kill(pid)
            if out.exists():  # a resumed run completed before its kill: the whole result, and no state left
                assert digest(out) == digest(ref) and not state.parent.exists()
                shutil.rmtree(out)  # and start over
                rounds.append([])
            else:
                rounds[-1].append(finished_blocks())
    for progress in rounds:
        assert progress == sorted(progress), f"a resumed run lost finished blocks: {progress}"
    resumable = finished_blocks() and not out.exists()
    final = run([*argv, "-o", str(out), "--overwrite"] if out.exists() else [*argv, "-o", str(out)])
    assert final.returncode == 0, final.stderr[-2000:]
    if resumable:
        assert f"resuming {method} after block" in final.stderr
    assert digest(out) == digest(ref) and not state.parent.exists()
    print(f"{method}: {KILLS} kills, {len(rounds) - 1} resumed runs completed equal to the uninterrupted one; "
          f"finished blocks after each kill: {rounds}")
