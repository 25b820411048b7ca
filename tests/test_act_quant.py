"""Activation quantization: ActSpec, W8A8 / LLM.int8 kernels, prepare → calibrate → convert, save/load, MiniLM."""

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import QuantLinear, QuantSpec
from lowbit.activation import (DYNAMIC_ACT_SPEC, STATIC_ACT_SPEC, W8A8_WEIGHT_SPEC, convert, prepare,
                               quantize_llm_int8, quantize_w8a8)
from lowbit.errors import CorruptFileError, InvalidSpecError, InvalidWeightError, LowbitError
from lowbit.formats.act import ActSpec
from lowbit.kernels import cpu, reference
from lowbit.kernels.dispatch import REFERENCE, force_kernel, linear_kernel, select_weight_kernel
from lowbit.tensor import QuantizedWeight

# ---- ActSpec --------------------------------------------------------------------------------

BAD_SPECS = [
    ({"bits": 16}, "bits=16"), ({"bits": 3}, "bits=3"), ({"bits": True}, "bits=True"),
    ({"granularity": "channel"}, "granularity"), ({"observer": "kl"}, "observer"),
    ({"granularity": "token"}, "static activation quantization needs granularity 'tensor'"),
    ({"percentile": 0}, "percentile"), ({"percentile": 100.5}, "percentile"), ({"ema_momentum": 0.0}, "ema_momentum"),
    ({"dynamic": True, "outlier_threshold": -1.0}, "outlier_threshold"),
    ({"outlier_threshold": 6.0}, "needs dynamic=True"), ({"symmetric": "yes"}, "symmetric"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_act_spec_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        ActSpec(**kwargs)


@pytest.mark.parametrize("spec", [ActSpec(), ActSpec.static("mse", symmetric=False), ActSpec.dynamic_per_token(),
                                  ActSpec.llm_int8(4.5), ActSpec.static("percentile", percentile=99.9, bits=6)])
def test_act_spec_round_trips_through_json(spec: ActSpec) -> None:
    assert ActSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_act_spec_from_dict_errors_name_the_field() -> None:
    with pytest.raises(InvalidSpecError, match=r"act: unknown key\(s\) \['granularty'\]"):
        ActSpec.from_dict({"granularty": "token"}, "act")
    with pytest.raises(InvalidSpecError, match="act: .*observer"):
        ActSpec.from_dict({"observer": "histogram"}, "act")
    assert ActSpec.llm_int8().describe() == "a8-tok-dyn-sym-o6"
    assert ActSpec.static("mse", symmetric=False).describe() == "a8-t-static-asym-mse"


# ---- kernels --------------------------------------------------------------------------------

def _layer(seed: int = 0, n: int = 48, k: int = 64,
           spec: QuantSpec = W8A8_WEIGHT_SPEC) -> tuple[QuantizedWeight, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return QuantizedWeight.from_float(torch.randn(n, k, generator=g) / 8, spec), torch.randn(n, generator=g)


@pytest.mark.parametrize("act", [ActSpec.dynamic_per_token(), ActSpec.dynamic_per_token(symmetric=False),
                                 ActSpec(dynamic=True), ActSpec.static(), ActSpec.static(symmetric=False)],
                         ids=lambda a: a.describe())
def test_reference_w8a8_is_float_linear_within_int8_error(act: ActSpec) -> None:
    weight, bias = _layer()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    x2d = x.reshape(-1, 64)
    scale = zero = None
    if not act.dynamic:  # calibrated on this very input
        lo, hi = min(x.min().item(), 0), max(x.max().item(), 0)
        scale = torch.tensor([max(-lo, hi) / 127 if act.symmetric else (hi - lo) / 255])
        zero = torch.tensor([0.0 if act.symmetric else round(-lo / scale.item())])
    y = reference.linear_w8a8(x, weight, bias, act, scale, zero)
    assert y.shape == (3, 5, 48) and y.dtype == x.dtype
    # exactly the dequantized int8 codes times the dequantized weight
    codes, s, z = reference.quantize_activation(x2d, act, scale, zero)
    assert torch.equal(codes, codes.round()) and codes.min() >= (-128 if act.symmetric else 0)
    assert codes.max() <= (127 if act.symmetric else 255)
    w = weight.dequantize()
    assert torch.allclose(y.reshape(-1, 48), ((codes - z) * s) @ w.T + bias, atol=1e-5)
    # and within the rounding bound of the float result: |Δy_ij| ≤ (s_i / 2) · ‖W_j‖₁
    error = (y.reshape(-1, 48) - F.linear(x2d, w, bias)).abs()
    assert (error <= s / 2 * w.abs().sum(1) + 1e-5).all()
    assert error.max() > 0


def test_dynamic_per_token_beats_per_tensor_on_rows_of_different_scale() -> None:
    weight, bias = _layer()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 1, 32).unsqueeze(1)
    exact = F.linear(x, weight.dequantize())

    def row_error(act: ActSpec) -> torch.Tensor:  # relative error of each token's output
        return (reference.linear_w8a8(x, weight, None, act) - exact).norm(dim=1) / exact.norm(dim=1)

    per_token, per_tensor = row_error(ActSpec.dynamic_per_token()), row_error(ActSpec(dynamic=True))
    assert per_token.max() < 0.02  # every token keeps ~8 bits of precision …
    assert per_tensor[:8].min() > 0.5  # … per-tensor scales flush the small tokens to (nearly) zero
    assert per_token.mean() * 20 < per_tensor.mean()


def test_llm_int8_keeps_outlier_columns_in_float() -> None:
    weight, bias = _layer()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    x[:, 7] = 60.0 * torch.sign(x[:, 7])  # one systematic outlier feature, as in large LMs
    exact = F.linear(x, weight.dequantize(), bias)
    llm_int8 = (reference.linear_w8a8(x, weight, bias, ActSpec.llm_int8()) - exact).pow(2).mean()
    per_tensor = (reference.linear_w8a8(x, weight, bias, ActSpec(dynamic=True)) - exact).pow(2).mean()
    per_token = (reference.linear_w8a8(x, weight, bias, ActSpec.dynamic_per_token()) - exact).pow(2).mean()
    assert llm_int8 * 100 < per_tensor and llm_int8 * 20 < per_token
    assert reference.outlier_columns(x, 6.0).nonzero().flatten().tolist() == [7]
    calm = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))  # no outliers: plain per-token int8
    assert torch.equal(reference.linear_w8a8(calm, weight, bias, ActSpec.llm_int8()),
                       reference.linear_w8a8(calm, weight, bias, ActSpec.dynamic_per_token()))


ACTS = [ActSpec.dynamic_per_token(), ActSpec.dynamic_per_token(symmetric=False), ActSpec.static(),
        ActSpec.static(symmetric=False), ActSpec.llm_int8(), ActSpec.dynamic_per_token(symmetric=False, bits=4)]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.describe())
@pytest.mark.parametrize("wspec", [W8A8_WEIGHT_SPEC, QuantSpec.int_(8, -1)], ids=["ch", "tensor"])
def test_cpu_int8_kernel_matches_reference(act: ActSpec, wspec: QuantSpec) -> None:
    weight, bias = _layer(spec=wspec)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    x[..., 3] *= 30
    scale, zero = torch.tensor([0.05]), torch.tensor([0.0 if act.symmetric else 120.0])
    assert linear_kernel(weight, torch.device("cpu"), act) is cpu.linear_int8
    fast = cpu.linear_int8(x, weight, bias, act, scale, zero)
    ref = reference.linear_w8a8(x, weight, bias, act, scale, zero)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-4)


def test_dispatch_falls_back_to_reference() -> None:
    cpu_dev = torch.device("cpu")
    int4, _ = _layer(spec=QuantSpec.int_(4, 32))
    assert linear_kernel(int4, cpu_dev, ActSpec.dynamic_per_token()) is reference.linear_w8a8
    with force_kernel("reference"):
        assert select_weight_kernel(int4, cpu_dev) is REFERENCE
    asym8, _ = _layer(spec=QuantSpec.int_(8, None, symmetric=False))
    assert linear_kernel(asym8, cpu_dev, ActSpec.dynamic_per_token()) is reference.linear_w8a8
    int8, _ = _layer()


# ---- QuantLinear ------------------------------------------------------------------------------

def test_quant_linear_act_spec_buffers_repr_and_gradient() -> None:
    lin = nn.Linear(64, 32)
    plain = QuantLinear.from_float(lin, W8A8_WEIGHT_SPEC)
    assert plain.act_spec is None and set(plain.state_dict()) == {"qdata", "scale", "bias"}
    static = QuantLinear.from_float(lin, W8A8_WEIGHT_SPEC, act_spec=ActSpec.static(symmetric=False),
                                    input_scale=torch.tensor([0.02]), input_zero=torch.tensor([100.0]))
    assert set(static.state_dict()) == {"qdata", "scale", "bias", "input_scale", "input_zero"}
    assert static.input_scale.dtype == torch.float32 and static.input_zero.shape == (1,)
    assert "act=a8-t-static-asym" in repr(static)
    dynamic = QuantLinear.from_float(lin, W8A8_WEIGHT_SPEC, act_spec=ActSpec.dynamic_per_token())
    assert set(dynamic.state_dict()) == {"qdata", "scale", "bias"}
    x = torch.randn(4, 64, requires_grad=True)
    y = dynamic(x)  # rounding is straight-through: the gradient is that of x @ Wᵀ
    y.sum().backward()
    assert torch.allclose(x.grad, dynamic.weight.dequantize().sum(0).expand(4, -1), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(dynamic(x), y, atol=1e-5)  # the fast path (no grad) agrees
    with pytest.raises(ValueError, match="input_scale"):
        QuantLinear.from_float(lin, W8A8_WEIGHT_SPEC, act_spec=ActSpec.static())


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(F.gelu(self.up(x))))


def test_prepare_calibrate_convert_on_a_toy_model() -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(8, 64)
    expected = model(x).detach()
    hidden = F.gelu(model.up(x)).detach()
    prepare(model, ActSpec.static(symmetric=False))
    with pytest.raises(LowbitError, match="saw no calibration data: up, down"):
        convert(model)
    model(x[:4])
    model(x[4:])
    convert(model)
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)  # skipped by default
    assert not model.up._forward_pre_hooks and not hasattr(model, "lowbit_act_calibration")
    lo, hi = min(hidden.min().item(), 0), hidden.max().item()
    assert torch.allclose(model.down.input_scale, torch.tensor([(hi - lo) / 255]))
    assert model.down.input_zero.item() == round(-lo / model.down.input_scale.item())
    assert torch.allclose(model(x), expected, atol=0.05)
    assert model.lowbit_method == "w8a8-static"


def test_dynamic_needs_no_calibration_and_overrides_keep_layers_float() -> None:
    model = Toy()
    convert(prepare(model, DYNAMIC_ACT_SPEC, act_overrides=[("down", None)]))
    assert model.up.act_spec == DYNAMIC_ACT_SPEC and model.down.act_spec is None
    assert model.lowbit_method == "w8a8-dynamic"
    assert quantize_llm_int8(Toy()).up.act_spec == ActSpec.llm_int8()


def test_nan_activations_name_the_layer() -> None:
    model = prepare(Toy(), STATIC_ACT_SPEC)
    with pytest.raises(InvalidWeightError, match="up: activations contain NaN/Inf"):
        model(torch.full((2, 64), float("nan")))


# ---- save / load ------------------------------------------------------------------------------

def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "minilm"])
@pytest.mark.parametrize("mode", ["static", "dynamic", "llm-int8"])
def test_save_load_identical(family: str, mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = lowbit.load(request.getfixturevalue({"llama": "llama_dir", "minilm": "minilm"}[family]))
    vocab = model.config.vocab_size
    if mode == "llm-int8":
        quantize_llm_int8(model, threshold=1.0)  # low threshold: these small models have few |x| > 6
    else:
        prepare(model, STATIC_ACT_SPEC if mode == "static" else DYNAMIC_ACT_SPEC)
        _out(model, _ids(vocab, seed=1))
        convert(model)
    ids = _ids(vocab)
    before = _out(model, ids)
    lowbit.save(model, tmp_path / "q")
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert set(qcfg["activations"]) == set(qcfg["modules"]) and qcfg["format_version"] == 1
    loaded = lowbit.load(tmp_path / "q")
    assert torch.equal(_out(loaded, ids), before)
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act_spec is not None and m.act_spec.dynamic == (mode != "static") for m in layers)
    assert loaded.lowbit_method == {"static": "w8a8-static", "dynamic": "w8a8-dynamic", "llm-int8": "llm-int8"}[mode]


def test_activation_config_errors(minilm: Path, tmp_path: Path) -> None:
    model = lowbit.quantize(lowbit.load(minilm), W8A8_WEIGHT_SPEC)
    lowbit.save(model, tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    assert "activations" not in config["quantization_config"]  # weight-only files stay as they were
    config["quantization_config"]["activations"] = {"encoder.nope": ActSpec.dynamic_per_token().to_dict()}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="encoder.nope"):
        lowbit.load(tmp_path / "q")
    name = "encoder.layer.0.output.dense"
    config["quantization_config"]["activations"] = {name: {"bits": 8, "granularity": "row"}}
    config_path.write_text(json.dumps(config))
    with pytest.raises(InvalidSpecError, match=f"activations\\['{name}'\\]: unknown activation granularity"):
        lowbit.load(tmp_path / "q")
    config["quantization_config"]["activations"] = {name: ActSpec.static().to_dict()}  # static, but no scales
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match=f"{name}.input_scale"):
        lowbit.load(tmp_path / "q")


# ---- MiniLM accuracy ------------------------------------------------------------------------

SUBJECTS = ["The old fisherman", "A young engineer", "My neighbour's cat", "The city council", "Our new teacher",
            "A quiet student", "The research team", "The small bakery", "An elderly couple", "The football coach",
            "A tired nurse", "The museum guide", "Every farmer in the valley", "The company's lawyer"]
VERBS = ["carefully repaired", "quickly painted", "proudly described", "accidentally broke", "slowly read",
         "happily shared", "secretly planned", "patiently explained", "loudly criticised", "finally sold"]
OBJECTS = ["the wooden boat", "a detailed report about rising prices", "the broken window", "an unusual recipe",
           "the history of the railway", "a letter from the bank", "the garden fence", "a map of the mountains",
           "the results of the experiment", "an old family photograph", "a song about the sea"]
TAILS = ["before the storm arrived.", "during the long winter evening.", "while everyone else was asleep.",
         "after lunch on Sunday.", "in front of a large crowd.", "without telling anyone.",
         "because the deadline was approaching.", "on the first day of spring.", "despite the terrible weather."]


def english_sentences() -> list[str]:
    """Held-out English: the built-in LM's eval text when installed, else sentences built here."""
    from lowbit.models.resolve import builtin_dir

    try:
        path = builtin_dir("tiny-lm") / "eval.txt"
    except LowbitError:
        path = None
    if path is not None and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 30]
        if len(lines) >= 192:
            return lines
    rng = random.Random(0)
    return [" ".join((rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)))
            for _ in range(300)]


@pytest.fixture(scope="module")
def minilm_setup(minilm: Path) -> tuple:
    from transformers import AutoTokenizer

    sentences = english_sentences()
    return lowbit.load(minilm), AutoTokenizer.from_pretrained(str(minilm)), sentences[:64], sentences[64:192]


@pytest.mark.parametrize("mode, floor", [("static", 0.99), ("dynamic", 0.995), ("llm-int8", 0.998)])
def test_minilm_w8a8_embeddings_stay_close(mode: str, floor: float, minilm_setup: tuple) -> None:
    import copy

    from lowbit.eval.similarity import embedding_similarity

    reference_model, tokenizer, calib, held_out = minilm_setup
    model = copy.deepcopy(reference_model)
    if mode == "llm-int8":
        quantize_llm_int8(model)
    else:  # defaults: int8 per-channel weights; static = int8 per-tensor asymmetric min-max activations
        prepare(model, STATIC_ACT_SPEC if mode == "static" else DYNAMIC_ACT_SPEC)
        with torch.no_grad():
            for sentence in calib:
                model(**tokenizer(sentence, return_tensors="pt"))
        convert(model)
    assert sum(isinstance(m, QuantLinear) and m.act_spec is not None for m in model.modules()) == 37
    assert embedding_similarity(model, reference_model, tokenizer, held_out) >= floor


def test_quantize_w8a8_calibrates_on_a_text_file(minilm_setup: tuple, tmp_path: Path) -> None:
    import copy

    from lowbit.algorithms.calib_data import CalibConfig
    from lowbit.eval.similarity import embedding_similarity

    reference_model, tokenizer, calib, held_out = minilm_setup
    (tmp_path / "calib.txt").write_text("\n".join(calib), encoding="utf-8")
    model = quantize_w8a8(copy.deepcopy(reference_model), tokenizer, CalibConfig(str(tmp_path / "calib.txt"), 8, 64))
    assert model.encoder.layer[0].output.dense.input_zero.item() > 0  # asymmetric: post-GELU inputs
    assert embedding_similarity(model, reference_model, tokenizer, held_out) >= 0.99
