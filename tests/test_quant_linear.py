import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import QuantLinear, QuantSpec, quantize
from lowbit.recipe import LayerOverride, QuantRecipe

SPECS = [QuantSpec.int_(8, None), QuantSpec.int_(4, 32, symmetric=False), QuantSpec.int_(3, 32),
         QuantSpec.nf4(32, double_quant=True), QuantSpec.fp4(32), QuantSpec.fp8(), QuantSpec("bf16")]


@pytest.mark.parametrize("spec", SPECS, ids=[s.describe() for s in SPECS])
def test_forward_is_linear_with_dequantized_weight(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_float(lin, spec)
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, q.weight.dequantize(), lin.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert torch.allclose(q.dequantize()(x), expected, atol=1e-6)


def test_backward_flows_to_input_only() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_float(lin, QuantSpec.int_(4, 32, symmetric=False))
    x = torch.randn(4, 64, requires_grad=True)
    y = q(x)
    y.pow(2).sum().backward()
    # dL/dx = dL/dy · W with W the dequantized weight, whichever kernel ran the forward (a decode-sized
    # batch may use int8 activations on CPU, so the forward itself is checked elsewhere)
    expected = (2 * y.detach()) @ q.weight.dequantize()
    assert torch.allclose(x.grad, expected, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_conv1d_is_converted_to_linear_semantics() -> None:
    transformers_pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    conv = transformers_pytorch_utils.Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs; weight [64, 48]
    nn.init.normal_(conv.bias)
    q = QuantLinear.from_float(conv, QuantSpec.int_(8, None))
    assert (q.in_features, q.out_features) == (64, 48)
    x = torch.randn(2, 64)
    assert torch.allclose(q(x), conv(x), atol=2e-2)


def test_state_dict_is_the_packed_weight() -> None:
    q = QuantLinear.from_float(nn.Linear(64, 16), QuantSpec.int_(4, 32, symmetric=False))
    sd = q.state_dict()
    assert set(sd) == {"qdata", "scale", "zero", "bias"}
    assert sd["qdata"].dtype == torch.uint8 and sd["qdata"].shape == (16, 32)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "down_proj": nn.Linear(64, 64)})
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.block["down_proj"](self.block["q_proj"](x)))


def test_quantize_skips_lm_head_by_default_and_mixes_precision() -> None:
    model = Toy()
    recipe = QuantRecipe(QuantSpec.int_(4, 32), overrides=(LayerOverride("down_proj", QuantSpec.int_(8, None)),))
    quantize(model, recipe)
    assert isinstance(model.lm_head, nn.Linear)
    assert model.block["q_proj"].spec.bits == 4
    assert model.block["down_proj"].spec.bits == 8
    assert model(torch.randn(2, 64)).shape == (2, 10)


def test_recipe_patterns() -> None:
    recipe = QuantRecipe(QuantSpec.int_(4, 32), skip=("lm_head", r"model\.layers\.0\..*"),
                         overrides=(LayerOverride("mlp.down_proj", None),))
    assert recipe.spec_for("model.layers.1.self_attn.q_proj") is not None
    assert recipe.spec_for("model.layers.0.self_attn.q_proj") is None
    assert recipe.spec_for("model.layers.1.mlp.down_proj") is None
    assert recipe.spec_for("lm_head") is None
    included = QuantRecipe(QuantSpec.int_(4, 32), include=("q_proj",))
    assert included.spec_for("a.q_proj") and included.spec_for("a.k_proj") is None
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
