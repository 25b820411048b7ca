"""GGUF block quantization (lowbit.io.gguf.quants): bytes, layouts, quality, importance, lowbit mapping."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lowbit.errors import InvalidSpecError, InvalidWeightError, ShapeError  # noqa: E402
from lowbit.formats.spec import QuantSpec  # noqa: E402
from lowbit.io.gguf import quants as Q  # noqa: E402
from lowbit.tensor import QuantizedWeight  # noqa: E402

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZED = LEGACY + K_TYPES
ALL = ["F32", "F16", "BF16"] + QUANTIZED

# RMSE of llama.cpp's own reference quantizers (quantize_row_*_ref, ggml-quants.c) on unit gaussian weights
LLAMA_CPP_RMSE = {"Q2_K": 0.2967, "Q3_K": 0.1502, "Q4_K": 0.0714, "Q5_K": 0.0359, "Q6_K": 0.0177}


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def awkward(cols: int = 256) -> torch.Tensor:
    """Rows that stress the reference rounding: zero/constant/negative-max blocks, ±max ties, exact .5
    ties, huge and fp16-subnormal magnitudes, a spike."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.zeros(cols), torch.full((cols,), -0.75), torch.full((cols,), 2.5)]
    neg = torch.randn(cols, generator=g) * 0.1
    neg[3::32] = -4.0
    rows.append(neg)
    tie = torch.randn(cols, generator=g)
    tie[5::32], tie[9::32] = 3.0, -3.0  # +max and -max in every block: the first one decides the sign
    rows.append(tie)
    rows.append(torch.round(torch.randn(cols, generator=g) * 8) / 2)  # many exact halves
    halves = torch.arange(cols, dtype=torch.float32) % 32 - 15.5
    halves[::32] = 127.0  # Q8_0: d = 1 → every other value is an exact .5 tie
    rows.append(halves)
    rows.append(torch.randn(cols, generator=g) * 3e3)
    rows.append(torch.randn(cols, generator=g) * 1e-6)
    spike = torch.zeros(cols)
    spike[17] = 1.0
    rows.append(spike)
    mixed = torch.randn(cols, generator=g)
    mixed[:32] = 0.0
    mixed[64:96] = 1e-4 * torch.randn(32, generator=g)
    rows.append(mixed)
    return torch.stack(rows)


def gguf_type(name: str):
    return gguf.GGMLQuantizationType[name]


def gguf_dequantize(data: torch.Tensor, name: str) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data.numpy(), gguf_type(name)), dtype=np.float32)


def bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)


def weighted_error(x: torch.Tensor, xq: torch.Tensor, imp: torch.Tensor) -> float:
    return float((imp * (x - xq) ** 2).sum())


# ---- type table --------------------------------------------------------------------------------------
def test_type_table() -> None:
    assert Q.type_from_name("q4_k") is gguf.GGMLQuantizationType.Q4_K
    assert Q.type_from_name(" Q8_0 ") is gguf.GGMLQuantizationType.Q8_0
    assert (Q.block_size("Q4_K"), Q.type_size("q4_k")) == (256, 144)
    assert (Q.block_size(gguf.GGMLQuantizationType.Q4_0), Q.type_size(2)) == (32, 18)
    assert Q.row_bytes("Q6_K", 512) == 420 and Q.row_bytes("F16", 10) == 20 and Q.row_bytes("BF16", 3) == 6
    assert Q.can_encode("q4_k", 512) and not Q.can_encode("q4_k", 288) and Q.can_encode("Q4_0", 288)
    assert not Q.can_encode("iq2_xxs", 256) and not Q.can_encode("nonsense", 256)
    with pytest.raises(InvalidSpecError, match="Q4_K"):  # the message lists the supported names
        Q.type_from_name("q4_z")
    with pytest.raises(InvalidSpecError, match="IQ2_XXS"):
        Q.quantize(torch.zeros(1, 256), gguf.GGMLQuantizationType.IQ2_XXS)


@pytest.mark.parametrize("name", ALL)
def test_output_shape_and_dtype(name: str) -> None:
    x = gaussian(3, 512)
    data = Q.quantize(x, name)
    assert data.dtype == torch.uint8 and tuple(data.shape) == (3, Q.row_bytes(name, 512))
    out = Q.dequantize(data, name, (3, 512))
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 512)
    assert Q.quantize(x[0], name).shape == (1, Q.row_bytes(name, 512))  # a 1-D weight is one row


# ---- bytes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["F32", "F16", "BF16"] + LEGACY)
def test_legacy_types_byte_identical_to_gguf(name: str) -> None:
    x = torch.cat([awkward(256), gaussian(40, 256, seed=1) * torch.logspace(-3, 2, 40).unsqueeze(1)])
    ours = Q.quantize(x, name).numpy()
    theirs = np.asarray(gguf.quants.quantize(x.numpy(), gguf_type(name))).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ALL)
def test_dequantize_through_gguf_is_bitwise_our_dequantize(name: str) -> None:
    x = torch.cat([awkward(512), gaussian(16, 512, seed=2)])
    imp = torch.rand(512, generator=torch.Generator().manual_seed(3)) ** 3
    for data in (Q.quantize(x, name), Q.quantize(x, name, imp)):
        ours = Q.dequantize(data, name, tuple(x.shape))
        assert np.array_equal(bits(ours), bits(gguf_dequantize(data, name).reshape(x.shape)))
        assert torch.isfinite(ours).all()


def test_k_quant_special_blocks() -> None:
    x = torch.zeros(2, 512)
    x[1, 300] = 1.0
    data = Q.quantize(x, "Q6_K")
    assert not data[0].any()  # an all-zero super-block is all zero bytes, as llama.cpp writes it
    for name in K_TYPES:
        out = Q.dequantize(Q.quantize(x, name), name, (2, 512))
        assert not out[0].any() and not out[1, :256].any()
        assert abs(float(out[1, 300]) - 1.0) < 0.35


def test_rows_are_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x = gaussian(12, 512, seed=4)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(5))
    for name in ("Q4_0", "Q4_K", "Q6_K"):
        whole = Q.quantize(x, name, imp)
        monkeypatch.setattr(Q, "CHUNK_ELEMS", 1024)  # two rows per chunk
        assert torch.equal(Q.quantize(x, name, imp), whole)
        assert torch.equal(Q.quantize(x[5], name, imp)[0], whole[5])
        monkeypatch.undo()


def test_half_precision_and_parameter_input() -> None:
    x = gaussian(4, 256, seed=6)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(Q.quantize(x.to(dtype), "Q4_K"), Q.quantize(x.to(dtype).float(), "Q4_K"))
    param = torch.nn.Parameter(x.clone())  # what an exporter hands over: no autograd graph is built
    imp = torch.rand(256, generator=torch.Generator().manual_seed(8))
    out = Q.quantize(param, "Q6_K", imp)
    assert not out.requires_grad and torch.equal(out, Q.quantize(x, "Q6_K", imp))


# ---- quality -----------------------------------------------------------------------------------------
def test_round_trip_error_bounds_and_k_quant_ordering() -> None:
    x = gaussian(64, 1024, seed=0)
    rmse = {}
    for name in ALL:
        out = Q.dequantize(Q.quantize(x, name), name, tuple(x.shape))
        rmse[name] = float(((out - x) ** 2).mean().sqrt())
    assert rmse["F32"] == 0.0 and rmse["F16"] < 1e-3 and rmse["BF16"] < 5e-3
    assert rmse["Q8_0"] < 0.006 and rmse["Q5_0"] < 0.045 and rmse["Q5_1"] < 0.04
    assert rmse["Q4_0"] < 0.09 and rmse["Q4_1"] < 0.08
    assert rmse["Q6_K"] < rmse["Q5_K"] < rmse["Q4_K"] < rmse["Q3_K"] < rmse["Q2_K"]
    assert rmse["Q4_K"] <= rmse["Q4_1"] and rmse["Q5_K"] <= rmse["Q5_1"] and rmse["Q6_K"] < rmse["Q5_K"]
    for name, reference in LLAMA_CPP_RMSE.items():  # llama.cpp's searches, so llama.cpp's error
        assert rmse[name] <= 1.02 * reference, (name, rmse[name], reference)


@pytest.mark.parametrize("name", QUANTIZED)
def test_importance_lowers_the_importance_weighted_error(name: str) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(32, 512, generator=g)
    imp = torch.exp(2.0 * torch.randn(512, generator=g))  # skewed: a few columns matter a lot
    plain = Q.dequantize(Q.quantize(x, name), name, tuple(x.shape))
    weighted = Q.dequantize(Q.quantize(x, name, imp), name, tuple(x.shape))
    assert weighted_error(x, weighted, imp) < 0.8 * weighted_error(x, plain, imp)


def test_importance_with_dead_columns_stays_sane() -> None:
    x = gaussian(8, 512, seed=12)
    imp = torch.ones(512)
    imp[:256] = 0.0  # columns that never saw activation
    for name in ("Q4_0", "Q4_K", "Q6_K", "Q2_K"):
        out = Q.dequantize(Q.quantize(x, name, imp), name, tuple(x.shape))
        assert float(((out - x)[:, 256:] ** 2).mean().sqrt()) < 0.35
        assert float(((out - x)[:, :256] ** 2).mean().sqrt()) < 0.6  # still quantized, not zeroed


# ---- lowbit integer weights, code for code --------------------------------------------------------------
MAPPABLE = [
    (QuantSpec.int_(4, 32, symmetric=True), "Q4_0", True),
    (QuantSpec.int_(4, 128, symmetric=True), "Q4_0", True),
    (QuantSpec.int_(4, None, symmetric=True), "Q4_0", True),
    (QuantSpec.int_(4, -1, symmetric=True), "Q4_0", True),
    (QuantSpec.int_(8, 32, symmetric=True), "Q8_0", True),
    (QuantSpec.int_(8, None, symmetric=True), "Q8_0", True),
    (QuantSpec.int_(5, 64, symmetric=True), "Q5_0", True),
    (QuantSpec.int_(4, 32, symmetric=True, scale_dtype="bfloat16"), "Q4_0", True),  # bf16 fits f16 exactly
    (QuantSpec.int_(4, 64, symmetric=True, scale_dtype="float32"), "Q4_0", False),
    (QuantSpec.int_(4, 64, symmetric=True, double_quant=True), "Q4_0", False),
    (QuantSpec.int_(4, 32, symmetric=False), "Q4_1", False),
    (QuantSpec.int_(4, 128, symmetric=False), "Q4_1", False),
    (QuantSpec.int_(5, None, symmetric=False), "Q5_1", False),
]


def gguf_codes(data: torch.Tensor, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The integer codes of legacy blocks, decoded by gguf with d=1 and m=0: q − 2^(b−1) for Q4_0/Q5_0
    (Q8_0: q), q for Q4_1/Q5_1 — the same numbers as lowbit's sym / asym codes."""
    blocks = data.reshape(-1, Q.type_size(name)).clone()
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    blocks[:, 0:2] = one
    if name in ("Q4_1", "Q5_1"):
        blocks[:, 2:4] = 0
    return torch.from_numpy(gguf_dequantize(blocks.reshape(shape[0], -1), name).reshape(shape))


@pytest.mark.parametrize(("spec", "name", "exact"), MAPPABLE, ids=[s.describe() for s, _, _ in MAPPABLE])
def test_from_quantized_weight_keeps_the_codes(spec: QuantSpec, name: str, exact: bool) -> None:
    x = gaussian(24, 384, seed=13) * 0.05
    qw = QuantizedWeight.from_float(x, spec)
    mapped = Q.from_quantized_weight(qw)
    assert mapped is not None
    qtype, data, err = mapped
    assert qtype is gguf_type(name) and tuple(data.shape) == (24, Q.row_bytes(name, 384))
    ours = Q.dequantize(data, qtype, qw.shape)
    reference = qw.dequantize()
    assert float((ours - reference).abs().max()) == pytest.approx(err, abs=0.0)
    if exact:
        assert err == 0.0 and torch.equal(ours, reference)
    else:
        assert err < 2e-3 * float(reference.abs().max())
    # the codes are lowbit's codes (lowbit's value is (q − Z)·S; with d=1, m=0 gguf decodes the block codes)
    scale, zero = qw.scale, qw.zero_point
    group = spec.group_size if spec.granularity == "group" else 384
    s = scale.expand(24, 384 // group) if spec.granularity == "tensor" else scale.reshape(24, -1)
    z = zero.expand(24, 384 // group) if spec.granularity == "tensor" else zero.reshape(24, -1)
    lowbit_codes = torch.round(reference.view(24, -1, group) / s.unsqueeze(-1) + z.unsqueeze(-1)).reshape(24, 384)
    assert torch.equal(lowbit_codes, gguf_codes(data, name, (24, 384)))


@pytest.mark.parametrize("spec", [
    QuantSpec.nf4(64), QuantSpec.fp4(64), QuantSpec.fp8(), QuantSpec.int_(3, 32), QuantSpec.int_(2, 32),
    QuantSpec.int_(6, 32), QuantSpec.int_(4, 48), QuantSpec.int_(8, 32, symmetric=False),
    QuantSpec.int_(4, 32, symmetric=False, zero_dtype="float16"), QuantSpec("fp16"),
], ids=lambda s: s.describe())
def test_from_quantized_weight_declines_what_does_not_fit(spec: QuantSpec) -> None:
    qw = QuantizedWeight.from_float(gaussian(4, 384, seed=14), spec)
    assert Q.from_quantized_weight(qw) is None


def test_from_quantized_weight_keeps_gptq_choices() -> None:
    # scales/zeros an algorithm chose (not RTN's): the codes must survive, not be re-rounded from float
    x = gaussian(16, 256, seed=15)
    spec = QuantSpec.int_(4, 64, symmetric=False)
    scale = torch.rand(16, 4, generator=torch.Generator().manual_seed(16)) * 0.3 + 0.2
    zero = torch.randint(3, 12, (16, 4), generator=torch.Generator().manual_seed(17)).float()
    qw = QuantizedWeight.from_qparams(x, spec, scale, zero)
    qtype, data, err = Q.from_quantized_weight(qw)
    # d = S and m = −Z·S rounded to float16: |m| < 6 → half an ulp ≤ 2^-9, and d's rounding times q ≤ 15
    assert err < 4e-3 and (Q.dequantize(data, qtype, qw.shape) - qw.dequantize()).abs().max() <= err
    requantized = Q.quantize(qw.dequantize(), "Q4_1")
    assert not torch.equal(requantized, data)  # RTN from float would have chosen other blocks


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q8_0"])
def test_to_quantized_weight_is_exact(name: str) -> None:
    x = torch.cat([awkward(256), gaussian(8, 256, seed=18)])
    imp = torch.rand(256, generator=torch.Generator().manual_seed(19))
    for data in (Q.quantize(x, name), Q.quantize(x, name, imp)):
        qw = Q.to_quantized_weight(name, data, tuple(x.shape))
        assert qw is not None and qw.spec.bits == {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8}[name]
        assert qw.spec.group_size == 32 and qw.spec.symmetric and qw.spec.scale_dtype == "float16"
        assert torch.equal(qw.dequantize(), Q.dequantize(data, name, tuple(x.shape)))
        back = Q.from_quantized_weight(qw)
        assert back is not None and back[2] == 0.0 and torch.equal(back[1], data)


@pytest.mark.parametrize("name", ["Q4_1", "Q5_1", "Q4_K", "Q6_K", "F16"])
def test_to_quantized_weight_declines_other_types(name: str) -> None:
    x = gaussian(2, 256)
    assert Q.to_quantized_weight(name, Q.quantize(x, name), (2, 256)) is None
    unsupported = gguf.GGMLQuantizationType.IQ2_XXS  # a type lowbit does not encode: the importer dequantizes
    assert Q.to_quantized_weight(unsupported, torch.zeros(2, 66, dtype=torch.uint8), (2, 256)) is None


# ---- errors ------------------------------------------------------------------------------------------
def test_row_length_not_a_multiple_of_the_block_is_a_shape_error() -> None:
    with pytest.raises(ShapeError, match="256"):
        Q.quantize(gaussian(2, 288), "Q4_K", name="blk.0.ffn_down")
    with pytest.raises(ShapeError, match="blk.0.attn_q.*32"):
        Q.quantize(gaussian(2, 40), "Q4_0", name="blk.0.attn_q")
    with pytest.raises(ShapeError):
        Q.row_bytes("Q6_K", 100)
    with pytest.raises(ShapeError, match="importance"):
        Q.quantize(gaussian(2, 256), "Q4_K", torch.ones(128))
    with pytest.raises(ShapeError):
        Q.dequantize(torch.zeros(2, 10, dtype=torch.uint8), "Q4_0", (2, 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected(bad: float) -> None:
    for name in ("Q4_K", "Q8_0", "F16"):
        x = gaussian(3, 256)
        x[2, 77] = bad
        with pytest.raises(InvalidWeightError, match="layer.w"):
            Q.quantize(x, name, name="layer.w")


def test_bad_importance_and_overflow_are_rejected() -> None:
    x = gaussian(2, 256)
    with pytest.raises(InvalidWeightError):
        Q.quantize(x, "Q4_K", -torch.ones(256))
    with pytest.raises(InvalidWeightError):
        Q.quantize(x, "Q4_K", torch.full((256,), float("nan")))
    with pytest.raises(InvalidWeightError, match="float16"):
        Q.quantize(x * 1e5, "F16")
    with pytest.raises(InvalidWeightError, match="float16"):
        Q.quantize(x * 1e7, "Q8_0")


def test_import_lowbit_does_not_import_gguf() -> None:
    code = "import sys, lowbit; assert 'gguf' not in sys.modules, 'import lowbit imported gguf'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
