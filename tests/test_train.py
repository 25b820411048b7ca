"""lowbit.train: the trainer loop, determinism, NaN stop, checkpoints, adamw8bit, schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lowbit.errors import InvalidSpecError
from lowbit.train import CheckpointMismatchError, NonFiniteLossError, TrainConfig, Trainer
from lowbit.train.checkpoint import find_checkpoint, load_checkpoint
from lowbit.train.trainer import BatchOrder, lr_at

from test_train_support import text_data, tiny_llama, trainable_state


def _config(**kw: object) -> TrainConfig:
    base = dict(steps=6, batch_size=2, lr=1e-2, seed=0, show_progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _train(config: TrainConfig, model: torch.nn.Module | None = None, callbacks: tuple = (), eval_data: bool = False):
    train, ev = text_data()
    model = model if model is not None else tiny_llama()
    result = Trainer(model, config, train, ev if eval_data else None, callbacks=callbacks).train()
    return model, result


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_trains_lower_heldout_loss_and_writes_logs(tmp_path: Path) -> None:
    train, ev = text_data()
    model = tiny_llama()
    config = _config(steps=30, batch_size=4, lr=3e-2, warmup_steps=3, schedule="cosine", eval_every=15,
                     out_dir=tmp_path, log_every=5)
    trainer = Trainer(model, config, train, ev)
    before = trainer.evaluate()
    result = trainer.train()
    assert result.eval_loss is not None and result.eval_loss < before - 1.0, (before, result.eval_loss)
    assert result.steps == 30 and result.tokens == 30 * 4 * 32 and result.tokens_per_s > 0
    assert result.peak_memory_bytes > 0 and math.isfinite(result.final_loss)
    lines = (tmp_path / "train_log.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,tokens,tokens_per_s,eval_loss,elapsed" and len(lines) == 1 + 6
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[2]["eval_loss"] is not None and records[0]["eval_loss"] is None
    assert result.plot_path == tmp_path / "loss.png" and result.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert result.log_path == tmp_path / "train_log.csv"


def test_same_seed_is_bit_identical_and_other_seed_differs() -> None:
    a, _ = _train(_config(seed=1))
    b, _ = _train(_config(seed=1))
    c, _ = _train(_config(seed=2))
    _assert_same(trainable_state(a), trainable_state(b))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_grad_accum_matches_one_big_batch() -> None:
    # lr 1e-3: Adam's first steps turn tiny gradient differences into lr-sized ones
    a, ra = _train(_config(batch_size=4, lr=1e-3))
    b, rb = _train(_config(batch_size=2, grad_accum=2, lr=1e-3))
    for name, value in trainable_state(a).items():
        torch.testing.assert_close(trainable_state(b)[name], value, atol=1e-5, rtol=1e-5)
    assert ra.tokens == rb.tokens
    assert ra.final_loss == pytest.approx(rb.final_loss, rel=1e-5)


def test_frozen_params_stay_and_callbacks_see_grads() -> None:
    model = tiny_llama()
    frozen = model.model.embed_tokens.weight.clone()
    seen = []

    class Probe:
        def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
            seen.append((step, model.lm_head.weight.grad is not None))

        def on_log(self, record: dict) -> None:
            seen.append(("log", record["step"]))

    _train(_config(steps=2), model, callbacks=(Probe(),))
    assert seen == [(1, True), ("log", 1), (2, True), ("log", 2)]
    assert torch.equal(model.model.embed_tokens.weight, frozen)


def test_extra_loss_is_added() -> None:
    class Pull:  # pulls the final norm towards zero
        def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor:
            return 100.0 * model.model.norm.weight.square().sum()

    plain, _ = _train(_config(steps=3))
    pulled, _ = _train(_config(steps=3), callbacks=(Pull(),))
    assert pulled.model.norm.weight.abs().mean() < plain.model.norm.weight.abs().mean()


def test_nan_names_step_and_layer_and_keeps_checkpoint(tmp_path: Path) -> None:
    class Poison:
        def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
            w = model.model.layers[0].mlp.down_proj.weight
            return w.sum() * float("nan") if step == 3 else None

    model = tiny_llama()
    with pytest.raises(NonFiniteLossError) as info:
        _train(_config(out_dir=tmp_path, checkpoint_every=1), model, callbacks=(Poison(),))
    assert info.value.step == 3 and info.value.parameter == "model.layers.0.mlp.down_proj.weight"
    assert "step 3" in str(info.value) and "model.layers.0.mlp.down_proj.weight" in str(info.value)
    ckpt = load_checkpoint(find_checkpoint(tmp_path))
    assert ckpt.step == 2
    for name, value in trainable_state(model).items():  # the bad step never reached the weights
        assert torch.equal(ckpt.params[name], value) and torch.isfinite(value).all()


class _Stop(Exception):
    pass


class _StopAfter:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, record: dict) -> None:
        if record["step"] == self.step:
            raise _Stop


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_in_process_is_bit_identical(tmp_path: Path, optimizer: str) -> None:
    config = _config(steps=6, optimizer=optimizer, out_dir=tmp_path / "a", checkpoint_every=2, grad_accum=2)
    reference, _ = _train(config)
    with pytest.raises(_Stop):  # dies after step 5; the checkpoint is of step 4
        _train(_config(steps=6, optimizer=optimizer, out_dir=tmp_path / "b", checkpoint_every=2, grad_accum=2),
               callbacks=(_StopAfter(5),))
    resumed, result = _train(_config(steps=6, optimizer=optimizer, out_dir=tmp_path / "b", checkpoint_every=2,
                                     grad_accum=2, resume=True))
    _assert_same(trainable_state(reference), trainable_state(resumed))
    assert result.steps == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_mismatched_parameters(tmp_path: Path) -> None:
    _train(_config(steps=2, out_dir=tmp_path, checkpoint_every=1))
    other = tiny_llama()
    other.lm_head.weight.requires_grad_(False)
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        _train(_config(steps=3, out_dir=tmp_path, resume=True), other)
    bigger = tiny_llama()
    bigger.lm_head = torch.nn.Linear(64, 4000, bias=False)
    with pytest.raises(CheckpointMismatchError, match=r"lm_head.weight.*\(4096, 64\).*\(4000, 64\)"):
        Trainer(bigger, _config(steps=3, out_dir=tmp_path, resume=True), text_data()[0]).train()


def test_checkpoint_write_failure_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    model, _ = _train(_config(steps=2, out_dir=tmp_path, checkpoint_every=1))
    good = load_checkpoint(tmp_path / "checkpoint")
    real = safetensors.torch.save_file
    calls = []

    def flaky(tensors: dict, path: str, *args: object, **kw: object) -> None:
        calls.append(path)
        if len(calls) == 2:  # the optimizer file of the next checkpoint
            Path(path).write_bytes(b"half")
            raise OSError("disk full")
        real(tensors, path, *args, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        _train(_config(steps=4, out_dir=tmp_path, checkpoint_every=1, resume=True))
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    again = load_checkpoint(tmp_path / "checkpoint")
    assert again.step == good.step == 2
    _assert_same(again.params, good.params)


def test_crash_between_renames_recovers_old_checkpoint(tmp_path: Path) -> None:
    _train(_config(steps=2, out_dir=tmp_path, checkpoint_every=1))
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")  # killed after moving the old one aside
    assert find_checkpoint(tmp_path) == tmp_path / ".checkpoint.old"
    _, result = _train(_config(steps=3, out_dir=tmp_path, checkpoint_every=1, resume=True))
    assert result.steps == 3 and find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert not (tmp_path / ".checkpoint.old").exists()


def test_adamw8bit_trains_like_adamw_with_quarter_state() -> None:
    from lowbit.train.adamw8bit import AdamW8bit, state_nbytes

    train, ev = text_data()
    losses, opts = {}, {}
    for name in ("adamw", "adamw8bit"):
        model = tiny_llama()
        result = Trainer(model, _config(steps=25, batch_size=4, lr=2e-2, optimizer=name), train, ev).train()
        losses[name] = result.eval_loss
        opts[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]) if name == "adamw" \
            else AdamW8bit([p for p in model.parameters() if p.requires_grad])
    assert losses["adamw8bit"] == pytest.approx(losses["adamw"], abs=0.15), losses
    for opt in opts.values():  # one step on the same parameters to fill each state
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
    ratio = state_nbytes(opts["adamw"]) / state_nbytes(opts["adamw8bit"])
    assert 3.5 < ratio <= 4.0, ratio


def test_adamw8bit_quantizers_roundtrip() -> None:
    from lowbit.train.adamw8bit import dequantize_signed, dequantize_sqrt, quantize_signed, quantize_sqrt

    x = torch.randn(1000)
    q, s = quantize_signed(x)
    assert q.dtype == torch.int8 and q.numel() == 1024 and s.shape == (4,)
    torch.testing.assert_close(dequantize_signed(q, s, x), x, atol=float(x.abs().max()) / 127, rtol=0)
    v = torch.rand(1000) * 1e-6
    v[5] = 1e-20  # tiny but non-zero: never stored as zero
    q, s = quantize_sqrt(v)
    assert q.dtype == torch.uint8 and int(q[5]) == 1
    back = dequantize_sqrt(q, s, v)
    assert torch.all(back > 0)
    torch.testing.assert_close(back.sqrt(), v.sqrt(), atol=float(v.sqrt().max()) / 255, rtol=0)


def test_gradient_checkpointing_gives_same_update() -> None:
    plain, _ = _train(_config(steps=2))
    checkpointed, _ = _train(_config(steps=2, gradient_checkpointing=True))
    assert checkpointed.model.gradient_checkpointing
    for name, value in trainable_state(plain).items():
        torch.testing.assert_close(trainable_state(checkpointed)[name], value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(checkpointed.model.layers[0].mlp.down_proj.weight,
                           tiny_llama().model.layers[0].mlp.down_proj.weight)


def test_bfloat16_autocast_trains() -> None:
    model, result = _train(_config(steps=3, compute_dtype="bfloat16"), eval_data=True)
    assert math.isfinite(result.final_loss) and result.eval_loss is not None
    assert model.lm_head.weight.dtype == torch.float32


def test_classification_task(tmp_path: Path) -> None:
    import transformers

    from lowbit.train import load_classification_data

    from test_train_support import tokenizer

    rows = [{"text": f"the {w} is good", "label": "pos"} for w in ("cat", "dog", "sun", "day")]
    rows += [{"text": f"the {w} is bad and sad", "label": "neg"} for w in ("cat", "dog", "sun", "day")]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, names = load_classification_data(path, tokenizer(), 16)
    assert names == ["neg", "pos"] and data.tensors["labels"].tolist() == [1] * 4 + [0] * 4
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=4096, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("bert.embeddings"))
    trainer = Trainer(model, _config(steps=20, batch_size=4, lr=1e-2, task="classification"), data, data)
    before = trainer.evaluate()
    result = trainer.train()
    assert result.eval_loss < before - 0.3, (before, result.eval_loss)


def test_schedules_and_batch_order() -> None:
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="linear")
    assert [round(lr_at(cfg, s), 4) for s in (1, 2, 3, 10)] == [0.5, 1.0, 1.0, 0.125]
    cos = TrainConfig(steps=10, lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(cos, 1) == 1.0 and 0.1 < lr_at(cos, 10) < 0.15
    assert lr_at(TrainConfig(steps=10, lr=0.3, schedule="constant"), 7) == 0.3
    order = BatchOrder(5, seed=4)
    stream = order.rows(0, 12).tolist()
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert BatchOrder(5, seed=4).rows(7, 5).tolist() == stream[7:12]


def test_config_and_model_errors() -> None:
    with pytest.raises(InvalidSpecError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(InvalidSpecError, match="out_dir"):
        TrainConfig(checkpoint_every=5)
    model = tiny_llama(trainable=())
    with pytest.raises(InvalidSpecError, match="no trainable parameters"):
        Trainer(model, _config(), text_data()[0])
