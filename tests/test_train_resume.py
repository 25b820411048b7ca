"""A training run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from test_train_support import make_model, reference_config, save_train_data, text_data, trainable_state

SCRIPT = Path(__file__).with_name("test_train_support.py")


def _run_args(data: Path, out_dir: Path, result: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "run", str(data), str(out_dir), str(result), "--steps", "8", "--batch", "2",
            "--accum", "2", "--checkpoint-every", "1", "--model", "mini", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _checkpoint_step(out_dir: Path) -> int:
    try:
        return json.loads((out_dir / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out, result = tmp_path / "run", tmp_path / "resumed.safetensors"
    data = save_train_data(tmp_path / "data.safetensors")
    proc = subprocess.Popen(_run_args(data, out, result, "--sleep", "0.2", "--resume"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_step(out) < 3:  # mid-training: 3 of 8 steps checkpointed
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the training subprocess made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not result.exists()
    killed_at = _checkpoint_step(out)
    assert 3 <= killed_at < 8

    done = subprocess.run(_run_args(data, out, result, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = load_file(str(result))

    # the uninterrupted reference run, in this process (same code, same single thread)
    from lowbit.train import Trainer

    assert torch.get_num_threads() == 1
    model = make_model("mini")
    Trainer(model, reference_config(steps=8, batch_size=2, grad_accum=2), text_data()[0]).train()
    reference = trainable_state(model)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert not any(p.name.startswith(".checkpoint") for p in out.iterdir())

