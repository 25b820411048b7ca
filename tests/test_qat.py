"""QAT building blocks: FakeQuantLinear converts exactly; the distillation loss is the KL it claims to be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.compress.qat import convert_qat, prepare_qat
from lowbit.errors import InvalidSpecError
from lowbit.formats.spec import QuantSpec
from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import QuantizedWeight

SPECS = [QuantSpec(bits=2, group_size=64, symmetric=False), QuantSpec(bits=3, group_size=128, symmetric=False),
         QuantSpec(bits=4, group_size=32, symmetric=True), QuantSpec(bits=8, group_size=None, granularity="channel"),
         QuantSpec.nf4(64), QuantSpec.fp4(32)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_fake_quant_starts_at_rtn_trains_and_converts_exactly(spec):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    fq = FakeQuantLinear.from_linear(lin, spec)
    assert torch.equal(fq.quantized_weight().detach(), QuantizedWeight.from_float(lin.weight.detach(), spec).dequantize())
    opt = torch.optim.Adam([p for p in fq.parameters() if p.requires_grad], 3e-4)
    x = torch.randn(64, 128)
    first = None
    for _ in range(30):
        loss = (fq(x) - lin(x)).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    if not spec.symmetric:  # symmetric specs: open question, see the issue note (int8 starts near optimal anyway)
        assert float(loss.detach()) < first  # the STE/LSQ gradients reach weight and scale
    assert fq.log_scale.grad is not None and (fq.zero.grad is not None) == (not spec.symmetric)
    converted = fq.convert()
    assert isinstance(converted, QuantLinear)
    assert torch.equal(converted.weight.dequantize(), fq.quantized_weight().detach())  # bit for bit


def test_activation_fake_quant_is_what_the_w4a8_layer_computes():
    from lowbit.formats.act import ActSpec

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    act = ActSpec.dynamic_per_token(bits=8)
    fq = FakeQuantLinear.from_linear(lin, SPECS[0], act_spec=act)
    x = torch.randn(3, 20, 128, requires_grad=True)
    y = fq(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # rounding of the input passed straight through
    weight_only = FakeQuantLinear.from_linear(lin, SPECS[0])
    assert 0 < (y - weight_only(x)).abs().max() < 0.05  # the input really is rounded, and only slightly
    converted = fq.convert()
    assert converted.act_spec == act
    with torch.no_grad():
        assert (converted(x) - fq(x)).abs().max() <= 1e-5
    with pytest.raises(InvalidSpecError, match="dynamic"):
        FakeQuantLinear.from_linear(lin, SPECS[0], act_spec=ActSpec.static())


def test_model_convert_equals_fake_quant_forward():
    model = lowbit.load("builtin:tiny-lm")
    targets = prepare_qat(model, SPECS[0])
    assert len(targets) == 28 and not model.lm_head.weight.requires_grad
    with torch.no_grad():  # move off the RTN grid, as training would
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.weight.add_(0.01 * torch.randn_like(m.weight))
                m.log_scale.add_(0.05)
    ids = torch.randint(0, 4096, (2, 40))  # > 8 rows: the packed layers take the exact CPU path
    fake = model(input_ids=ids).logits
    convert_qat(model)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert (model(input_ids=ids).logits - fake).abs().max() <= 1e-4


def test_gptq_init_is_the_gptq_model_and_errors():
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.quantize import load_tokenizer, quantize
    from lowbit.recipe import QuantRecipe

    tok = load_tokenizer(lowbit.load("builtin:tiny-lm"))
    calib = CalibConfig(samples=4, seq_len=64)
    gptq = quantize(lowbit.load("builtin:tiny-lm"), QuantRecipe(SPECS[1], "gptq"), calibration=calib, tokenizer=tok)
    model = lowbit.load("builtin:tiny-lm")
    prepare_qat(model, SPECS[1], init="gptq", tokenizer=tok, calib=calib)
    down = model.model.layers[1].mlp.down_proj
    assert torch.equal(down.quantized_weight().detach(), gptq.model.layers[1].mlp.down_proj.weight.dequantize())
    with pytest.raises(InvalidSpecError, match="already quantized"):
        prepare_qat(model, SPECS[1])
    with pytest.raises(InvalidSpecError, match="not double"):
        prepare_qat(lowbit.load("builtin:tiny-lm"), QuantSpec(bits=4, group_size=32, double_quant=True))
    with pytest.raises(InvalidSpecError, match="QAT init"):
        prepare_qat(lowbit.load("builtin:tiny-lm"), SPECS[0], init="awq")


def test_distillation_loss_is_the_kl():
    from lowbit.compress.distill import DistillTrainer
    from lowbit.train.data import TokenDataset
    from lowbit.train.trainer import TrainConfig

    teacher, student = lowbit.load("builtin:tiny-lm"), lowbit.load("builtin:tiny-lm")
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    ids = torch.randint(0, 4096, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    data = TokenDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    batch = data.batch(torch.arange(2))
    for kl, temp, alpha in (("forward", 1.0, 1.0), ("reverse", 2.0, 1.0), ("forward", 1.0, 0.0)):
        tr = DistillTrainer(student, TrainConfig(steps=1, show_progress=False), data, teacher, temperature=temp,
                            alpha=alpha, kl=kl)
        got = float(tr._loss_sum(student, batch).detach())
        with torch.no_grad():
            s, t = student(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1]
        keep = labels[:, 1:] != -100
        s, t = s[keep], t[keep]
        if alpha == 0:
            want = float(F.cross_entropy(s, labels[:, 1:][keep], reduction="sum"))
        else:
            ls, lt = F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1)
            p, a, b = (lt, lt, ls) if kl == "forward" else (ls, ls, lt)
            want = float(temp * temp * (p.exp() * (a - b)).sum())
        assert got == pytest.approx(want, rel=1e-4)
    with pytest.raises(InvalidSpecError):
        DistillTrainer(student, TrainConfig(steps=1), data, teacher, temperature=0)


# ---- QA-LoRA: a group-wise adapter that merges into the zero-points --------------------------------------------
def test_group_lora_trains_and_merges_onto_the_same_integer_grid():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 32)
    spec = QuantSpec(bits=4, group_size=64, symmetric=False, zero_dtype="float16")
    base = QuantizedWeight.from_float(lin.weight.detach(), QuantSpec(bits=4, group_size=64, symmetric=False))
    fq = FakeQuantLinear.from_quantized(base, lin.bias.detach(), spec=spec)
    fq.freeze_codes()
    assert not fq.weight.requires_grad
    assert torch.equal(fq.quantized_weight().detach(), base.dequantize())  # step 0 is the base model
    fq.add_group_lora(4, seed=1)
    target = torch.nn.Linear(256, 32)  # something the adapter must move towards
    opt = torch.optim.Adam([fq.lora_A, fq.lora_B, fq.zero, fq.log_scale], 1e-2)
    x = torch.randn(128, 256)
    losses = []
    for _ in range(40):
        loss = (fq(x) - target(x)).pow(2).mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] and fq.lora_B.grad is not None and fq.lora_B.abs().sum() > 0
    assert fq.log_scale.abs().max() > 0  # the scales moved too …
    delta = fq.group_delta().detach()
    assert delta.shape == (32, 4) and delta.abs().max() > 0
    converted = fq.convert()
    assert converted.weight.spec.float_zero
    assert torch.equal(converted.weight.dequantize(), fq.quantized_weight().detach())  # merged exactly, bit for bit
    # … yet the integer codes are the base model's: the update lives in the scales and zero-points, nothing was
    # re-rounded
    assert torch.equal(converted.weight.tensors["qdata"], base.tensors["qdata"])
    with torch.no_grad():
        assert (converted(x) - fq(x)).abs().max() <= 1e-4


def test_group_lora_needs_groups_and_float_zeros():
    from lowbit.compress.qat import QATConfig

    lin = torch.nn.Linear(128, 16)
    with pytest.raises(InvalidSpecError, match="QA-LoRA needs"):
        FakeQuantLinear.from_linear(lin, QuantSpec(bits=4, group_size=64, symmetric=False)).add_group_lora(4)
    with pytest.raises(InvalidSpecError, match="asymmetric"):
        QATConfig(QuantSpec(bits=4, group_size=128, symmetric=True), lora_rank=8)
    assert QATConfig(QuantSpec(bits=4, group_size=128, symmetric=False), lora_rank=8).spec.float_zero
    with pytest.raises(InvalidSpecError, match="steps"):
        QATConfig(QuantSpec(bits=2, group_size=64, symmetric=False), steps=0)


# ---- block-wise QAT on the built-in LM ----------------------------------------------------------------------
def _ppl_setup():
    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.eval.perplexity import read_text, tokenize_text
    from lowbit.models.resolve import builtin_dir
    from lowbit.quantize import load_tokenizer

    tok = load_tokenizer(lowbit.load("builtin:tiny-lm"))
    ids = tokenize_text(tok, read_text(builtin_dir("tiny-lm") / "eval.txt"))
    return tok, ids, CalibConfig


def _baseline(spec, method, tok, calib):
    from lowbit.quantize import quantize
    from lowbit.recipe import QuantRecipe

    return quantize(lowbit.load("builtin:tiny-lm"), QuantRecipe(spec, method), calibration=calib, tokenizer=tok)


def test_blockwise_qat_fast_beats_rtn_and_resumes(tmp_path):
    """A short run (80 steps per block on 16 windows of 128): far below RTN at w2g64; a resumed run (blocks 0–1
    from the checkpoint, 2–3 trained again) ends with exactly the uninterrupted run's model."""
    import json

    from lowbit.compress.qat import QATConfig, qat
    from lowbit.eval.perplexity import perplexity

    tok, ids, CalibConfig = _ppl_setup()
    ids = ids[: 64 * 128]
    calib = CalibConfig(samples=16, seq_len=128)
    spec = QuantSpec(bits=2, group_size=64, symmetric=False)
    config = QATConfig(spec, steps=80, batch_size=2)
    model = lowbit.load("builtin:tiny-lm")
    result = qat(model, config, tokenizer=tok, calib=calib, checkpoint_dir=tmp_path / "ck")
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert all(b.loss_end < b.loss_start for b in result.blocks.values())
    rtn = perplexity(_baseline(spec, "rtn", tok, calib), ids).ppl
    got = perplexity(model, ids).ppl
    assert got < 0.85 * rtn, (got, rtn)

    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert sorted(state["blocks"]) == ["0", "1", "2", "3"]
    state["blocks"] = {k: v for k, v in state["blocks"].items() if k in ("0", "1")}  # as if killed after block 1
    (tmp_path / "ck" / "state.json").write_text(json.dumps(state))
    (tmp_path / "ck" / "block-2.safetensors").unlink()
    again = lowbit.load("builtin:tiny-lm")
    qat(again, config, tokenizer=tok, calib=calib, checkpoint_dir=tmp_path / "ck", resume=True)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(InvalidSpecError, match="other settings"):
        qat(lowbit.load("builtin:tiny-lm"), QATConfig(spec, steps=31), tokenizer=tok, calib=calib,
            checkpoint_dir=tmp_path / "ck", resume=True)

    # a damaged checkpoint is a typed error naming the file (issue 21), never a traceback or NaN weights
    from safetensors.torch import load_file, save_file

    from lowbit.errors import CorruptFileError

    good = (tmp_path / "ck" / "state.json").read_text()
    nested = '{"a":' * 100000 + "1" + "}" * 100000
    huge = json.dumps({**json.loads(good), "blocks": {"0": {"mse_start": 10 ** 400, "mse_end": 1}}})  # float() overflows
    for text in (nested, huge):
        (tmp_path / "ck" / "state.json").write_text(text)
        with pytest.raises(CorruptFileError, match="state.json: not a lowbit QAT checkpoint"):
            qat(lowbit.load("builtin:tiny-lm"), config, tokenizer=tok, calib=calib, checkpoint_dir=tmp_path / "ck",
                resume=True)
    (tmp_path / "ck" / "state.json").write_text(good)
    block0 = load_file(str(tmp_path / "ck" / "block-0.safetensors"))
    first = next(iter(block0))
    block0[first] = torch.full_like(block0[first], float("nan"))
    save_file(block0, str(tmp_path / "ck" / "block-0.safetensors"))
    with pytest.raises(CorruptFileError, match="block-0.safetensors: .*NaN"):
        qat(lowbit.load("builtin:tiny-lm"), config, tokenizer=tok, calib=calib, checkpoint_dir=tmp_path / "ck",
            resume=True)


def test_cli_qat_lora_saves_a_model_that_loads(tmp_path, capsys):
    import json

    from lowbit.cli import main

    out = tmp_path / "qat"
    eval_file = tmp_path / "eval.txt"
    from lowbit.models.resolve import builtin_dir

    eval_file.write_text((builtin_dir("tiny-lm") / "eval.txt").read_text()[:4000])
    rc = main(["qat", "builtin:tiny-lm", "--bits", "4", "--group-size", "128", "--lora", "4", "--data", "builtin",
               "--samples", "4", "--seq-len", "64", "--steps", "3", "--e2e-steps", "2", "--eval-data", str(eval_file),
               "-o", str(out), "--json", "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "qat-lora" and report["format"] == "int4-g128-asym-fz" and report["layers"] == 28
    assert report["ppl"]["qat"] > 0 and not (out / "checkpoint").exists()
    assert report["e2e_steps"] == 2 and report["e2e_loss"] > 0  # the end-to-end distillation phase ran
    model = lowbit.load(out)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.weight.spec.float_zero
    assert main(["qat", "builtin:tiny-lm", "--data", "builtin", "-o", str(out), "--quiet"]) != 0  # OUT exists
    assert main(["qat", "builtin:tiny-lm", "--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x"),
                 "--quiet"]) != 0
    assert not (tmp_path / "x").exists()  # nothing half-made left behind


@pytest.mark.slow
@pytest.mark.parametrize("bits,group,rank", [(2, 64, 0), (3, 128, 0), (4, 128, 16)], ids=["w2g64", "w3g128",
                                                                                         "w4g128-lora"])
def test_qat_beats_gptq_at_the_same_format(bits, group, rank):
    """The acceptance ordering on the built-in LM: QAT (QA-LoRA at w4g128) below GPTQ, same format and data."""
    from lowbit.compress.qat import QATConfig, qat
    from lowbit.eval.perplexity import perplexity

    tok, ids, CalibConfig = _ppl_setup()
    calib = CalibConfig(samples=128, seq_len=256)
    spec = QuantSpec(bits=bits, group_size=group, symmetric=False)
    gptq = perplexity(_baseline(spec, "gptq", tok, calib), ids).ppl
    model = lowbit.load("builtin:tiny-lm")
    qat(model, QATConfig(spec, steps=640, lora_rank=rank, lr=1e-3 if rank else 2e-4), tokenizer=tok, calib=calib)
    got = perplexity(model, ids).ppl
    assert got < gptq, (got, gptq)
