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
         QuantSpec(bits=4, group_size=32, symmetric=True), QuantSpec(bits=8, group_size=None, granularity="channel")]


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
        assert float(loss) < first  # the STE/LSQ gradients reach weight and scale
    assert fq.log_scale.grad is not None and (fq.zero.grad is not None) == (not spec.symmetric)
    converted = fq.convert()
    assert isinstance(converted, QuantLinear)
    assert torch.equal(converted.weight.dequantize(), fq.quantized_weight().detach())  # bit for bit


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
        got = float(tr._loss_sum(student, batch))
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
