"""Folding an update into a quantized weight: GPTQ on the base's own grid vs rounding; trained biases."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import HessianAccumulator, gptq_on_grid
from lowbit.formats.codecs import encode_on_grid
from lowbit.peft import LoraConfig, apply_adapter
from lowbit.tensor import QuantizedWeight


@pytest.mark.parametrize("spec", [lowbit.QuantSpec.int_(4, 32, symmetric=False), lowbit.QuantSpec.int_(3, 64),
                                  lowbit.QuantSpec.nf4(64, double_quant=True), lowbit.QuantSpec.fp4(32)],
                         ids=lambda s: s.describe())
def test_gptq_on_grid_keeps_the_grid_and_beats_rounding_in_output_error(spec: lowbit.QuantSpec) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g)
    base = QuantizedWeight.from_float(w, spec)
    update = 0.05 * torch.randn(48, 8, generator=g) @ torch.randn(8, 128, generator=g) * w.std()
    target = base.dequantize() + update                     # W' = deq(Q) + ΔW (a merged low-rank update)
    # correlated inputs (as real activations are): a few directions carry most of the energy
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    acc = HessianAccumulator(128)
    acc.add_batch(x)
    ours = gptq_on_grid(target, acc.hessian, base)
    rounded = QuantizedWeight(spec, base.shape, encode_on_grid(target, dict(base.tensors), spec))
    for key in base.tensors:  # scales / zero-points / double-quant metadata untouched
        if key != "qdata":
            assert torch.equal(ours.tensors[key], base.tensors[key])
    err = lambda qw: (x @ (qw.dequantize() - target).t()).norm()  # noqa: E731
    assert err(ours) < 0.7 * err(rounded)
    assert err(ours) < (x @ update.t()).norm()  # better than dropping the update


def test_bias_all_trains_through_a_quantized_base() -> None:
    model = lowbit.load("builtin:tiny-lm")
    lowbit.quantize(model, lowbit.QuantSpec.int_(4, 64, symmetric=False))
    bias = torch.nn.Parameter(torch.zeros(model.model.layers[0].self_attn.q_proj.out_features))
    model.model.layers[0].self_attn.q_proj.bias = bias  # give one QuantLinear a bias
    apply_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    ids = torch.randint(0, 1000, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert bias.requires_grad and bias.grad is not None and bias.grad.abs().sum() > 0


def test_lora_trains_over_an_activation_quantized_base() -> None:
    """LLM.int8()-style W8A8 layers (activations quantized per token) are a base like any other."""
    model = lowbit.load("builtin:tiny-lm")
    lowbit.quantize(model, lowbit.QuantRecipe(lowbit.QuantSpec.int_(8, None), "llm-int8"))
    assert model.model.layers[0].self_attn.q_proj.act_spec is not None
    apply_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 56 and all(g is not None and g.abs().sum() > 0 for g in grads)
