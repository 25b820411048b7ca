"""LoRA family over any base: Hugging Face peft interop both ways, merge/unmerge, switching, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import InvalidSpecError, LowbitError
from lowbit.peft import (LoraConfig, adapter_names, apply_adapter, delete_adapter, disable_adapters, load_adapter,
                         per_sample_adapters, save_adapter, set_adapter)
from lowbit.peft.merge import merge, merge_and_unload, unmerge

peft = pytest.importorskip("peft", reason="Hugging Face peft not installed")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))

# (name, lowbit/peft LoraConfig kwargs)
LORA_CASES = [
    ("lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("rslora-all-linear", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    ("dora", dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], use_dora=True)),
    ("patterns", dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|o_proj)", rank_pattern={"o_proj": 2},
                      alpha_pattern={"q_proj": 3.0})),
    ("modules-to-save", dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"])),
]


def _randomize(model: torch.nn.Module) -> None:
    """Non-zero B (and DoRA magnitudes off their initial norms) so adapters change the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _hf(path: Path, *, encoder: bool = False) -> torch.nn.Module:
    cls = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path).eval()


@pytest.mark.parametrize("case,kwargs", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_lowbit_adapter_runs_in_peft(case: str, kwargs: dict, llama_dir: Path, tmp_path: Path) -> None:
    model = lowbit.load(llama_dir)
    apply_adapter(model, LoraConfig(**kwargs))
    _randomize(model)
    ours = model(IDS).logits
    save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_hf(llama_dir), tmp_path / "a")(IDS).logits
    assert (ours - ours.detach()).abs().max() == 0
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - lowbit.load(llama_dir)(IDS).logits).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("case,kwargs", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_peft_adapter_runs_in_lowbit(case: str, kwargs: dict, llama_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    pm = peft.get_peft_model(_hf(llama_dir), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    _randomize(pm)
    theirs = pm(IDS).logits
    pm.save_pretrained(tmp_path / "p")
    model = load_adapter(lowbit.load(llama_dir), tmp_path / "p")
    assert torch.allclose(model(IDS).logits, theirs, atol=1e-5, rtol=0)


def test_minilm_lora_both_ways(minilm: Path, tmp_path: Path) -> None:
    tokens = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    model = lowbit.load(minilm)
    apply_adapter(model, LoraConfig(r=4, target_modules=["query", "value", "dense"], task_type="FEATURE_EXTRACTION"))
    _randomize(model)
    ours = model(input_ids=tokens).last_hidden_state
    save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_hf(minilm, encoder=True), tmp_path / "a")(input_ids=tokens)
    assert torch.allclose(ours, theirs.last_hidden_state, atol=1e-5, rtol=0)
    pm = peft.get_peft_model(_hf(minilm, encoder=True), peft.LoraConfig(r=4, target_modules=["key"], use_dora=True))
    _randomize(pm)
    pm.save_pretrained(tmp_path / "p")
    mine = load_adapter(lowbit.load(minilm), tmp_path / "p")
    assert torch.allclose(mine(input_ids=tokens).last_hidden_state, pm(input_ids=tokens).last_hidden_state,
                          atol=1e-5, rtol=0)


def test_minilm_adalora_both_ways(minilm: Path, tmp_path: Path) -> None:
    from lowbit.peft import AdaLoraConfig

    tokens = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    schedule = dict(init_r=4, target_r=2, total_step=10, target_modules=["query", "value"])
    model = lowbit.load(minilm)
    apply_adapter(model, AdaLoraConfig(task_type="FEATURE_EXTRACTION", **schedule))
    _randomize(model)
    save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_hf(minilm, encoder=True), tmp_path / "a")(input_ids=tokens)
    assert torch.allclose(model(input_ids=tokens).last_hidden_state, theirs.last_hidden_state, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    pm = peft.get_peft_model(_hf(minilm, encoder=True), peft.AdaLoraConfig(**schedule))
    _randomize(pm)
    pm.save_pretrained(tmp_path / "p")
    mine = load_adapter(lowbit.load(minilm), tmp_path / "p")
    assert torch.allclose(mine(input_ids=tokens).last_hidden_state, pm(input_ids=tokens).last_hidden_state,
                          atol=1e-5, rtol=0)


def test_packed_weights_stay_integer_under_dtype_casts() -> None:
    """QLoRA: a bf16 cast (what FSDP's mixed precision does) never turns packed codes into floats."""
    model = lowbit.load("builtin:tiny-lm")
    lowbit.quantize(model, lowbit.QuantSpec.nf4(64, double_quant=True))
    apply_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    model.to(torch.bfloat16)
    packed = [b for n, b in model.named_buffers() if n.endswith(("qdata", "scale_q"))]
    assert packed and not any(b.is_floating_point() for b in packed)  # uint8 codes, int8 double-quant scales
    ids = IDS % 1000
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gpt2_conv1d_base(gpt2_dir: Path, tmp_path: Path) -> None:
    model = lowbit.load(gpt2_dir)
    apply_adapter(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    _randomize(model)
    ours = model(IDS).logits
    save_adapter(model, tmp_path / "a")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "a")(IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    reference = ours.detach()
    merge(model)
    assert torch.allclose(model(IDS).logits, reference, atol=1e-4, rtol=0)


SPECS = [None, lowbit.QuantSpec.int_(4, 32, symmetric=False), lowbit.QuantSpec.nf4(64, double_quant=True),
         lowbit.QuantSpec.int_(8, None)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "float" if s is None else s.describe())
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_any_base(spec: lowbit.QuantSpec | None, dora: bool) -> None:
    model = lowbit.load("builtin:tiny-lm")
    if spec is not None:
        lowbit.quantize(model, spec)
    apply_adapter(model, LoraConfig(r=8, target_modules="all-linear", use_dora=dora))
    _randomize(model)
    ids = IDS % 1000
    with torch.no_grad():
        adapted = model(ids).logits
        base_out = None
        with disable_adapters(model):
            base_out = model(ids).logits
        report = merge(model, merge_dtype="float32")  # exact float merge
        assert not report.requantized and report.mean_delta_rel_error == 0
        assert torch.allclose(model(ids).logits, adapted, atol=1e-4, rtol=0)
        unmerge(model)
        assert torch.equal(model(ids).logits, adapted)
        if spec is not None:
            report = merge(model)  # re-quantized with the base's own spec
            assert report.requantized and len(report.layers) == 28
            kinds = {type(layer.base_layer).__name__ for layer in
                     (m for m in model.modules() if isinstance(m, lowbit.peft.AdapterLayer))}
            assert kinds == {"QuantLinear"}
            merged = model(ids).logits
            # never further from the adapted model than the unadapted base is
            assert (merged - adapted).norm() < (base_out - adapted).norm()
            unmerge(model)
            assert torch.equal(model(ids).logits, adapted)


def test_merge_and_unload_leaves_plain_model(tmp_path: Path) -> None:
    model = lowbit.load("builtin:tiny-lm")
    lowbit.quantize(model, lowbit.QuantSpec.int_(4, 64, symmetric=False))
    apply_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model, report = merge_and_unload(model)
    assert not any(isinstance(m, lowbit.peft.AdapterLayer) for m in model.modules())
    assert report.requantized and adapter_names(model) == []
    lowbit.save(model, tmp_path / "m")
    again = lowbit.load(tmp_path / "m")
    assert torch.equal(again(IDS % 1000).logits, model(IDS % 1000).logits)


def test_several_adapters_switch_disable_delete_per_sample() -> None:
    model = lowbit.load("builtin:tiny-lm")
    ids = IDS % 1000
    base = model(ids).logits.detach()
    apply_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), "a")
    apply_adapter(model, LoraConfig(r=2, target_modules=["v_proj", "q_proj"]), "b")
    _randomize(model)  # only b is active → trainable; randomize a's B too
    set_adapter(model, "a")
    _randomize(model)
    out_a = model(ids).logits.detach()
    set_adapter(model, "b")
    out_b = model(ids).logits.detach()
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    with disable_adapters(model):
        assert torch.equal(model(ids).logits, base)
    with per_sample_adapters(model, ["a", "__base__"]):
        mixed = model(ids).logits.detach()
    assert torch.allclose(mixed[0], out_a[0], atol=1e-6) and torch.allclose(mixed[1], base[1], atol=1e-6)
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    set_adapter(model, "a")
    assert torch.allclose(model(ids).logits, out_a, atol=1e-6)
    delete_adapter(model, "a")
    assert not any(isinstance(m, lowbit.peft.AdapterLayer) for m in model.modules())
    assert torch.equal(model(ids).logits, base)


def test_pissa_and_loftq_initialisation(tmp_path: Path) -> None:
    ids = IDS % 1000
    model = lowbit.load("builtin:tiny-lm")
    base = model(ids).logits.detach()
    apply_adapter(model, LoraConfig(r=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa"))
    assert torch.allclose(model(ids).logits, base, atol=1e-4)  # residual + principal part = W
    _randomize(model)
    tuned = model(ids).logits.detach()
    save_adapter(model, tmp_path / "pissa")  # saved as plain rank-2r LoRA over the original weights
    again = load_adapter(lowbit.load("builtin:tiny-lm"), tmp_path / "pissa")
    assert torch.allclose(again(ids).logits, tuned, atol=1e-4)
    theirs = peft.PeftModel.from_pretrained(_hf(lowbit.models.resolve.builtin_dir("tiny-lm")), tmp_path / "pissa")
    assert torch.allclose(theirs(ids).logits, tuned, atol=1e-4)

    spec = {"format": "int", "bits": 2, "granularity": "group", "group_size": 32, "symmetric": False}
    plain = lowbit.load("builtin:tiny-lm")
    lowbit.quantize(plain, lowbit.QuantSpec.from_dict(spec))
    loftq = lowbit.load("builtin:tiny-lm")
    apply_adapter(loftq, LoraConfig(r=16, target_modules="all-linear", init_lora_weights="loftq",
                                    loftq_config={"spec": spec, "loftq_iter": 3}))
    err_plain = (plain(ids).logits - base).norm()
    err_loftq = (loftq(ids).logits - base).norm()
    assert err_loftq < 0.9 * err_plain  # the adapter starts out correcting the quantization error
    with pytest.raises(LowbitError, match="LoftQ needs the float weights"):
        apply_adapter(plain, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq"))


def test_peft_get_peft_model_on_lowbit_int4(tmp_path: Path) -> None:
    from lowbit.peft.hf import register_quant_linear

    model = lowbit.load("builtin:tiny-lm")
    lowbit.quantize(model, lowbit.QuantSpec.int_(4, 64, symmetric=False))
    pm = peft.get_peft_model(model, register_quant_linear(peft.LoraConfig(r=4, target_modules="all-linear"), model))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = IDS % 1000
    losses = []
    for _ in range(4):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.eval()
    theirs = pm(ids).logits.detach()
    pm.save_pretrained(tmp_path / "p")
    mine = lowbit.load("builtin:tiny-lm")
    lowbit.quantize(mine, lowbit.QuantSpec.int_(4, 64, symmetric=False))
    load_adapter(mine, tmp_path / "p")
    assert torch.equal(mine(ids).logits, theirs)


def test_bad_input_errors(llama_dir: Path, tmp_path: Path) -> None:
    model = lowbit.load(llama_dir)
    with pytest.raises(InvalidSpecError, match="nearest names: .*q_proj"):
        apply_adapter(model, LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(InvalidSpecError, match=r"r=200 is larger than this layer allows"):
        apply_adapter(model, LoraConfig(r=200, target_modules=["k_proj"]))
    with pytest.raises(TypeError):
        LoraConfig(rank=4)  # unknown keys are errors
    with pytest.raises(InvalidSpecError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="olora")
    assert not any(isinstance(m, lowbit.peft.AdapterLayer) for m in model.modules())  # nothing half-applied
    other = lowbit.load(llama_dir)
    apply_adapter(other, LoraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(other, tmp_path / "a")
    small = lowbit.peft.load_adapter  # onto a model with other shapes: names the layer and both shapes
    from conftest import make_tiny_llama

    wide = lowbit.load(make_tiny_llama(tmp_path / "wide", hidden=64, intermediate=128))
    with pytest.raises(LowbitError, match=r"q_proj.*shape \(4, 128\).*\(4, 64\)"):
        small(wide, tmp_path / "a")
    assert adapter_names(wide) == []
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_magic": true}')
    with pytest.raises(LowbitError, match="use_magic"):
        load_adapter(lowbit.load(llama_dir), tmp_path / "a")
