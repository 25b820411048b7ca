"""`lowbit finetune` / `eval --adapter` / `merge`: the CLI contract, every method, QLoRA + merge, DDP, SIGKILL resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.models.resolve import builtin_dir

pytest.importorskip("peft", reason="Hugging Face peft not installed")

TEXT = builtin_dir("tiny-lm") / "calib.txt"
FAST = ["--seq-len", "64", "--batch-size", "4", "--quiet", "--json"]


def _run_json(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


NAMES = ["Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hal"]
THINGS = ["apple", "book", "coin", "lamp", "pen", "shell"]


def _facts(seed: int, count: int) -> list[tuple[str, str]]:
    """(question, answer) pairs of a small template language the demo model (Python docs) never saw."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.sample(NAMES, 2)
        thing, n, k = rng.choice(THINGS), rng.randint(2, 9), rng.randint(1, 9)
        out.append((f"{a} has {n} {thing}s. {b} gives {a} {k} more. How many {thing}s does {a} have?",
                    f"{a} has {n + k} {thing}s."))
    return out


def template_text(path: Path, seed: int, count: int) -> Path:
    path.write_text("\n".join(f"{q} {a}" for q, a in _facts(seed, count)) + "\n")
    return path


def instruction_jsonl(path: Path, seed: int, count: int) -> Path:
    with path.open("w") as f:
        for q, a in _facts(seed, count):
            f.write(json.dumps({"prompt": f"Question: {q}\nAnswer:", "response": f" {a}"}) + "\n")
    return path


METHODS = [  # (peft, extra flags, steps, lr)
    ("lora", [], 12, "1e-2"),
    ("qlora", [], 12, "1e-2"),
    ("dora", [], 12, "1e-2"),
    ("adalora", ["--lora-r", "4"], 12, "3e-2"),
    ("ia3", [], 12, "3e-2"),
    ("adapter", ["--reduction-factor", "8"], 12, "1e-2"),
    ("prompt", ["--num-virtual-tokens", "8", "--prompt-init", "vocab"], 12, "3e-2"),
    ("prefix", ["--num-virtual-tokens", "8"], 12, "3e-2"),
]


@pytest.mark.parametrize("peft,flags,steps,lr", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_trains_and_lowers_held_out_loss(peft: str, flags: list[str], steps: int, lr: str,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / peft
    data = template_text(tmp_path / "facts.txt", 0, 300)
    r = _run_json(["finetune", "builtin:tiny-lm", "--peft", peft, "--data", str(data), "--steps", str(steps),
                   "--lr", lr, "-o", str(out), *flags, *FAST], capsys)
    assert set(r) >= {"out", "steps", "tokens", "tokens_per_s", "final_loss", "peak_memory_bytes"}
    assert r["out"] == str(out) and r["steps"] == steps and r["tokens"] == steps * 4 * 64
    assert r["eval_loss"] < 0.95 * r["initial_eval_loss"], r
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 1000 and (out / "train_log.csv").is_file()
    e = _run_json(["eval", "builtin:tiny-lm", "--adapter", str(out), "--ppl", "--seq-len", "64", "--json",
                   "--quiet"], capsys)
    assert e["adapter"] == str(out) and e["ppl"] > 1


def test_qlora_nf4_instructions_then_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = instruction_jsonl(tmp_path / "train.jsonl", 0, 160)
    held = instruction_jsonl(tmp_path / "held.jsonl", 1, 40)
    out = tmp_path / "qlora"
    r = _run_json(["finetune", "builtin:tiny-lm", "--peft", "qlora", "--data", str(train), "--eval-data", str(held),
                   "--steps", "20", "--lr", "1e-2", "--lora-r", "8", "-o", str(out), "--seq-len", "64", "--batch-size",
                   "8", "--quiet", "--json"], capsys)
    assert r["eval_loss"] < 0.8 * r["initial_eval_loss"], r
    run = json.loads((out / "lowbit_finetune.json").read_text())
    assert run["base"]["quantize"]["format"] == "nf4" and run["base"]["quantize"]["double_quant"]

    requant = _run_json(["merge", "builtin:tiny-lm", str(out), "-o", str(tmp_path / "m4"), "--eval-data", str(held),
                         "--json", "--quiet"], capsys)
    assert requant["requantized"] and requant["layers_merged"] == 28 and requant["merge_method"] == "gptq-grid"
    assert abs(requant["eval_loss_before"] - r["eval_loss"]) < 1e-4  # the adapter as trained
    # the merged, re-quantized model keeps the fine-tune: within 2 % of the unmerged model's loss
    assert requant["eval_loss_after"] <= 1.02 * requant["eval_loss_before"], requant
    assert abs(requant["loss_after"] - requant["loss_before"]) <= 0.02 * requant["loss_before"]
    info = _run_json(["info", str(tmp_path / "m4"), "--json"], capsys)
    assert info["spec_counts"] == {"nf4-b64-dq": 28}
    flt = _run_json(["merge", "builtin:tiny-lm", str(out), "-o", str(tmp_path / "mf"), "--merge-dtype", "float32",
                     "--eval-data", str(held), "--json", "--quiet"], capsys)
    assert not flt["requantized"] and abs(flt["loss_after"] - flt["loss_before"]) < 1e-4
    assert abs(flt["eval_loss_after"] - flt["eval_loss_before"]) < 1e-4
    e = _run_json(["eval", str(tmp_path / "mf"), "--ppl", "--json", "--quiet"], capsys)
    assert abs(e["ppl"] - flt["ppl_after"]) < 1e-3


def test_sequence_classification_on_minilm(minilm: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An encoder gets a fresh classification head (trained in full, peft's modules_to_save) and a LoRA;
    peft's AutoPeftModelForSequenceClassification reads the result."""
    import random

    rng = random.Random(0)
    with (tmp_path / "cls.jsonl").open("w") as f:
        for _ in range(160):
            label = rng.choice(["positive", "negative"])
            words = ["good", "great", "fine", "nice"] if label == "positive" else ["bad", "awful", "poor", "sad"]
            f.write(json.dumps({"text": f"this was {rng.choice(words)} and {rng.choice(words)}", "label": label}) + "\n")
    out = tmp_path / "cls"
    r = _run_json(["finetune", str(minilm), "--peft", "lora", "--data", str(tmp_path / "cls.jsonl"), "--steps", "30",
                   "--lr", "1e-2", "--lora-r", "4", "--target-modules", "query,value", "--seq-len", "16",
                   "--batch-size", "8", "-o", str(out), "--quiet", "--json"], capsys)
    assert r["task"] == "classification" and r["eval_loss"] < 0.2 * r["initial_eval_loss"], r
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    import peft
    import transformers

    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=2)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
    batch = tok(["this was great and nice", "this was awful and sad"], return_tensors="pt")
    assert model(**batch).logits.argmax(-1).tolist() == [1, 0]  # labels sorted: negative=0, positive=1


def test_finetune_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n')
    assert main(["finetune", "builtin:tiny-lm", "--data", str(bad), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "question" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["finetune", "builtin:tiny-lm", "--data", str(empty), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert main(["finetune", "builtin:tiny-lm", "--data", str(TEXT), "--target-modules", "q_prj", "-o",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert "q_proj" in capsys.readouterr().err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


TRAIN = ["finetune", "builtin:tiny-lm", "--peft", "lora", "--lora-r", "4", "--data", str(TEXT), "--seq-len", "32",
         "--lr", "1e-3", "--eval-fraction", "0", "--quiet", "--json"]


def test_ddp_two_processes_match_one_with_double_batch(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    ddp = subprocess.run([*launcher, "--standalone", "--nproc-per-node", "2", "-m", "lowbit", *TRAIN, "--steps", "3",
                          "--batch-size", "2", "-o", str(tmp_path / "ddp")], env=_env(), capture_output=True,
                         text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(_cli(*TRAIN, "--steps", "3", "--batch-size", "4", "-o", str(tmp_path / "one")),
                            env=_env(), capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _tensors(tmp_path / "ddp"), _tensors(tmp_path / "one")
    assert a.keys() == b.keys() and len(a) == 56
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)


def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path: Path) -> None:
    run = [*TRAIN, "--steps", "12", "--batch-size", "2", "--checkpoint-every", "2", "--lora-dropout", "0.1"]
    full = subprocess.run(_cli(*run, "-o", str(tmp_path / "full")), env=_env(), capture_output=True, text=True,
                          timeout=400)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*run, "-o", str(out)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text()).get("step", 0) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists()
    resumed = subprocess.run(_cli(*run, "-o", str(out), "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _tensors(tmp_path / "full"), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
