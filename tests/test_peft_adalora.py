"""AdaLoRA: peft's files both ways (before and after pruning), the budget schedule run as trainer
callbacks (checked against peft's own RankAllocator), merging, training, quantized bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowbit
from conftest import base_model, train_steps
from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft import apply_adapter, load_adapter, save_adapter
from lowbit.peft.adalora import AdaLoraAdapter, AdaLoraConfig, AdaLoraScheduler, adalora_callbacks
from lowbit.peft.base import adapter_layers
from lowbit.peft.lora import LoraConfig
from lowbit.peft.merge import merge, unmerge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# peft warns about its own AdaLoRA rank_pattern when loading any pruned AdaLoRA file (its LoRA check)
pytestmark = pytest.mark.filterwarnings("ignore:The following rank_pattern keys:RuntimeWarning")

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=2, total_step=10, tinit=2, tfinal=2, deltaT=1)


def hf_llama(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 4096, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=ids()).logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def lowbit_train(model: torch.nn.Module, steps: int, lr: float = 1e-2, callbacks: list | None = None) -> list[float]:
    """The trainer's order: loss + extra_loss → backward → step → after_optimizer_step → zero_grad."""
    callbacks = adalora_callbacks(model) if callbacks is None else callbacks
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=ids(step), labels=ids(step)).loss
        losses.append(loss.item())
        for cb in callbacks:
            extra = cb.extra_loss(model, step)
            loss = loss if extra is None else loss + extra
        loss.backward()
        opt.step()
        for cb in callbacks:
            cb.after_optimizer_step(model, step)
        opt.zero_grad(set_to_none=True)
    return losses


def peft_train(pm: torch.nn.Module, steps: int, lr: float = 1e-2) -> None:
    """peft's documented loop (global_step from 0)."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    for global_step in range(steps):
        loss = pm(input_ids=ids(global_step + 1), labels=ids(global_step + 1)).loss
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(global_step)
        opt.zero_grad(set_to_none=True)


def peft_config(**kw) -> "peft.AdaLoraConfig":
    return peft.AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", lora_alpha=16, **{**SCHEDULE, **kw})


@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
def test_peft_file_loads_into_lowbit_and_back(llama_dir, tmp_path, pruned):
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_llama(llama_dir), peft_config(init_lora_weights=False))
    if pruned:
        peft_train(pm, 6)  # inside the budgeting phase: the file holds fewer rows than init_r
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    expected = logits(pm)
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (saved["rank_pattern"] is not None) == pruned

    model = lowbit.load(llama_dir).eval()
    load_adapter(model, tmp_path / "peft")
    close(logits(model), expected)

    save_adapter(model, tmp_path / "lowbit")  # …and back: peft reads lowbit's re-saved file
    again = peft.PeftModel.from_pretrained(hf_llama(llama_dir), tmp_path / "lowbit").eval()
    close(logits(again), expected)
    assert json.loads((tmp_path / "lowbit" / "adapter_config.json").read_text())["rank_pattern"] == \
        saved["rank_pattern"]


@pytest.mark.parametrize("steps", [0, 6, 10], ids=["untrained", "budgeting", "final"])
def test_lowbit_file_loads_into_peft(llama_dir, tmp_path, steps):
    torch.manual_seed(0)
    model = lowbit.load(llama_dir)
    apply_adapter(model, AdaLoraConfig(target_modules=TARGETS, lora_alpha=16, **SCHEDULE))
    randomize(model)
    lowbit_train(model, steps)
    model.eval()
    save_adapter(model, tmp_path / "a")
    expected = logits(model)
    pm = peft.PeftModel.from_pretrained(hf_llama(llama_dir), tmp_path / "a").eval()
    close(logits(pm), expected)

    back = lowbit.load(llama_dir).eval()  # and lowbit reads its own pruned file
    load_adapter(back, tmp_path / "a")
    close(logits(back), expected)


def test_schedule_matches_peft(llama_dir):
    """Same start, data and optimizer: lowbit's callbacks prune exactly the triplets peft's allocator does."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_llama(llama_dir), peft_config())
    model = lowbit.load(llama_dir)
    apply_adapter(model, AdaLoraConfig(target_modules=TARGETS, lora_alpha=16, **SCHEDULE))
    start = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in pm.named_parameters()
             if "lora_" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(start[n.replace(".adapters.default", "")])
    pm.train()
    model.train()
    peft_train(pm, 7)
    lowbit_train(model, 7)
    ours = lowbit.peft.adapter_config(model).rank_pattern
    theirs = pm.peft_config["default"].rank_pattern
    assert ours and ours == {k.replace(".default", ""): v for k, v in theirs.items()}


def test_budget_reaches_target(llama_dir, tmp_path):
    model = lowbit.load(llama_dir)
    config = AdaLoraConfig(target_modules=TARGETS, **{**SCHEDULE, "tfinal": 0})
    apply_adapter(model, config)
    (scheduler,) = adalora_callbacks(model)
    assert scheduler.budget(0) == (6 * 6, False) and scheduler.budget(2)[0] == 36  # warm-up: init_r × 6 layers
    lowbit_train(model, 10, callbacks=[scheduler])
    assert scheduler.finalized
    ranks = scheduler.kept_ranks()
    assert sum(ranks.values()) == config.target_r * 6 == sum(sum(v) for v in config.rank_pattern.values())
    for name, layer in adapter_layers(model).items():
        adapter = layer.adapters["default"]
        nonzero = int((adapter.lora_E != 0).sum())
        assert nonzero == ranks[name]
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")) == 12


def test_final_phase_keeps_pattern(llama_dir):
    model = lowbit.load(llama_dir)
    apply_adapter(model, AdaLoraConfig(target_modules=["q_proj"], **SCHEDULE))
    lowbit_train(model, 10)  # steps 9 and 10 are the final phase (tfinal=2): masks re-applied each step
    pattern = lowbit.peft.adapter_config(model).rank_pattern
    for name, layer in adapter_layers(model).items():
        keep = torch.tensor(pattern[f"{name}.lora_E"])
        assert torch.all(layer.adapters["default"].lora_E.detach().view(-1)[~keep] == 0)


def test_orthogonal_regulariser(llama_dir):
    model = lowbit.load(llama_dir)
    apply_adapter(model, AdaLoraConfig(target_modules=["q_proj"], orth_reg_weight=0.5, **SCHEDULE))
    (scheduler,) = adalora_callbacks(model)
    adapter = adapter_layers(model)["model.layers.0.self_attn.q_proj"].adapters["default"]
    with torch.no_grad():  # orthonormal A rows and B columns in every layer → zero penalty
        for layer in adapter_layers(model).values():
            a = layer.adapters["default"]
            a.lora_A.copy_(torch.eye(6, a.lora_A.shape[1]))
            a.lora_B.copy_(torch.eye(a.lora_B.shape[0], 6))
    assert float(scheduler.extra_loss(model, 1).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        adapter.lora_A.mul_(2)  # AAᵀ = 4I: ‖3I‖_F = 3·√6, one of 4 matrices
    assert float(scheduler.extra_loss(model, 1).detach()) == pytest.approx(0.5 * 3 * 6 ** 0.5 / 4, rel=1e-5)
    model2 = lowbit.load(llama_dir)
    apply_adapter(model2, AdaLoraConfig(target_modules=["q_proj"], orth_reg_weight=0.0, **SCHEDULE))
    assert adalora_callbacks(model2)[0].extra_loss(model2, 1) is None


def test_merge_and_unmerge(llama_dir):
    model = lowbit.load(llama_dir).eval()
    apply_adapter(model, AdaLoraConfig(target_modules=TARGETS, **SCHEDULE))
    randomize(model)
    base = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    adapted = logits(model)
    merge(model)
    assert torch.allclose(logits(model), adapted, atol=1e-4, rtol=1e-5)
    unmerge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, base)
    close(logits(model), adapted)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int4"])
def test_trains(llama_dir, quantized):
    model = base_model(llama_dir, quantized)
    apply_adapter(model, AdaLoraConfig(target_modules=TARGETS, lora_alpha=32, **SCHEDULE))
    assert all(isinstance(layer.adapters["default"], AdaLoraAdapter) for layer in adapter_layers(model).values())
    adapter = adapter_layers(model)["model.layers.0.self_attn.q_proj"].adapters["default"]

    def check(params):
        assert adapter.lora_E.grad is not None and adapter.lora_E.grad.abs().sum() > 0
    losses = train_steps(model, ids(3), lr=2e-2, check=check)
    assert losses[-1] < losses[0]


def test_callbacks_only_for_adalora(llama_dir):
    model = lowbit.load(llama_dir)
    apply_adapter(model, LoraConfig(target_modules=["q_proj"]))
    assert adalora_callbacks(model) == []
    with pytest.raises(InvalidSpecError, match="not ADALORA"):
        AdaLoraScheduler(model)
    with pytest.raises(InvalidSpecError, match="unknown adapter"):
        adalora_callbacks(model, "other")


def test_pruned_adapter_cannot_restart_schedule(llama_dir, tmp_path):
    model = lowbit.load(llama_dir)
    apply_adapter(model, AdaLoraConfig(target_modules=["q_proj"], **SCHEDULE))
    lowbit_train(model, 10)
    save_adapter(model, tmp_path / "a")
    again = lowbit.load(llama_dir)
    load_adapter(again, tmp_path / "a", trainable=True)
    with pytest.raises(LowbitError, match="already pruned"):
        adalora_callbacks(again)


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_step=None), "total_step is required"),
    (dict(total_step=0), "total_step is required"),
    (dict(total_step=10, tinit=5, tfinal=5), "tinit=5 must be < total_step - tfinal"),
    (dict(total_step=10, init_r=4, target_r=8), "target_r=8 must be ≤ init_r=4"),
    (dict(total_step=10, init_r=0), "init_r must be a positive integer"),
    (dict(total_step=10, beta1=1.0), "beta1 must be in"),
    (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
    (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, init_r=2, target_r=1, rank_pattern={"x.lora_E": [True]}), "rank_pattern"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(InvalidSpecError, match=match):
        AdaLoraConfig(target_modules=["q_proj"], **kwargs)


def test_rank_pattern_for_untargeted_layer(llama_dir):
    model = lowbit.load(llama_dir)
    config = AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_r=2, target_r=1,
                           rank_pattern={"model.layers.0.mlp.up_proj.lora_E": [True, False]})
    with pytest.raises(InvalidSpecError, match="not targeted"):
        apply_adapter(model, config)


def test_lowbit_trainer_runs_the_schedule(llama_dir):
    """The callbacks inside lowbit's own trainer (steps numbered from 1): the run ends at target_r."""
    train = pytest.importorskip("lowbit.train")
    from lowbit.train.data import TokenDataset

    model = lowbit.load(llama_dir)
    apply_adapter(model, AdaLoraConfig(target_modules=["q_proj", "v_proj"], **SCHEDULE))
    x = torch.randint(5, 4096, (8, 12), generator=torch.Generator().manual_seed(0))
    data = TokenDataset({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    callbacks = adalora_callbacks(model)
    config = train.TrainConfig(steps=10, batch_size=2, lr=1e-2, show_progress=False, plot=False)
    train.Trainer(model, config, data, callbacks=callbacks).train()
    assert callbacks[0].finalized and sum(callbacks[0].kept_ranks().values()) == 2 * 4


def test_resume_after_budgeting(llama_dir):
    """A scheduler rebuilt after the budgeting phase (a resumed run) keeps the pruned rows, either from
    the old scheduler's state_dict or, without it, from the zeros in E."""
    model = lowbit.load(llama_dir)
    apply_adapter(model, AdaLoraConfig(target_modules=["q_proj", "v_proj"], **SCHEDULE))
    (first,) = adalora_callbacks(model)
    lowbit_train(model, 9, callbacks=[first])
    kept = first.kept_ranks()
    assert first.finalized and sum(kept.values()) == 8

    restored = AdaLoraScheduler(model)
    restored.load_state_dict(first.state_dict())
    assert restored.finalized and restored.kept_ranks() == kept

    for layer in adapter_layers(model).values():
        layer.adapters["default"].rank_pattern = None  # as after loading a checkpoint's tensors only
    fresh = AdaLoraScheduler(model)
    fresh.after_optimizer_step(model, 10)
    assert fresh.finalized and fresh.kept_ranks() == kept


def test_interrupted_run_resumes_mid_budget_bit_identically(llama_dir, tmp_path):
    """The trainer checkpoints the scheduler's importance averages: a run stopped during the budgeting
    phase and resumed ends with the same adapter and ranks as an uninterrupted one."""
    from lowbit.train import TrainConfig, Trainer
    from lowbit.train.data import TokenDataset

    x = torch.randint(5, 4096, (8, 12), generator=torch.Generator().manual_seed(0))
    data = TokenDataset({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})

    class Stop:
        def after_optimizer_step(self, model, step):
            if step == 5:
                raise KeyboardInterrupt

    def run(out, extra=(), resume=False):
        torch.manual_seed(0)
        model = lowbit.load(llama_dir)
        apply_adapter(model, AdaLoraConfig(target_modules=["q_proj", "v_proj"], **SCHEDULE))
        callbacks = adalora_callbacks(model)
        config = TrainConfig(steps=10, batch_size=2, lr=1e-2, show_progress=False, plot=False, out_dir=out,
                             checkpoint_every=2, resume=resume)
        Trainer(model, config, data, callbacks=[*callbacks, *extra]).train()
        return model, callbacks[0]

    full, full_sched = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", extra=[Stop()])
    resumed, sched = run(tmp_path / "cut", resume=True)
    a = {n: p for n, p in full.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert sched.kept_ranks() == full_sched.kept_ranks()
