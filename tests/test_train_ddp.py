"""2-process DDP (torchrun, gloo on CPU) with batch B trains like 1 process with batch 2B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_train_support import reference_config, save_train_data, text_data, tiny_llama, trainable_state

SCRIPT = Path(__file__).with_name("test_train_support.py")


def test_two_process_ddp_matches_single_process_double_batch(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lowbit.train import Trainer

    out, result = tmp_path / "ddp", tmp_path / "ddp.safetensors"
    data = save_train_data(tmp_path / "data.safetensors")
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", str(SCRIPT), "run", str(data), str(out), str(result),
           "--steps", "4", "--batch", "2", "--accum", "2", "--checkpoint-every", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = load_file(str(result))

    model = tiny_llama()
    single = Trainer(model, reference_config(steps=4, batch_size=4, grad_accum=2), text_data()[0]).train()
    reference = trainable_state(model)
    assert ddp.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ddp[name], reference[name], atol=1e-5, rtol=0)

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone wrote the logs
    assert records[-1]["tokens"] == single.tokens
    assert abs(records[-1]["loss"] - single.final_loss) < 1e-5
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["position"] == 4 * 2 * 2 * 2
    rng = load_file(str(out / "checkpoint" / "rng.safetensors"))
    assert {"torch_cpu.rank0", "torch_cpu.rank1"} <= rng.keys()
