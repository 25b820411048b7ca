"""Round-trip error bounds, sizes and invariants of every format (table-driven)."""

import math

import pytest
import torch

from lowbit.errors import InvalidSpecError, InvalidWeightError, ShapeError
from lowbit.formats import NF4_VALUES, QuantSpec, max_abs_error, mse, sqnr_db
from lowbit.formats.codebooks import FP4_VALUES
from lowbit.formats.codecs import stored_layout
from lowbit.formats.primitives import grouped
from lowbit.tensor import QuantizedWeight, quantize_tensor

W = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.05
W[3, 17] = 0.9  # an outlier

# (spec, minimum SQNR in dB on W)
CASES = [
    (QuantSpec.int_(8, None, symmetric=True), 35.0),
    (QuantSpec.int_(8, 64, symmetric=False), 40.0),
    (QuantSpec.int_(6, 32, symmetric=False), 30.0),
    (QuantSpec.int_(5, -1, symmetric=True), 5.0),
    (QuantSpec.int_(4, 128, symmetric=False), 17.0),
    (QuantSpec.int_(4, 128, symmetric=True), 15.0),
    (QuantSpec.int_(4, 32, symmetric=False, double_quant=True), 19.0),
    (QuantSpec.int_(3, 64, symmetric=False), 11.0),
    (QuantSpec.int_(4, 64, symmetric=False, zero_dtype="float16"), 18.0),
    (QuantSpec.int_(2, 32, symmetric=False), 5.0),
    (QuantSpec.nf4(64), 18.0),
    (QuantSpec.nf4(64, double_quant=True), 18.0),
    (QuantSpec.fp4(32), 16.0),
    (QuantSpec.fp8("e4m3"), 28.0),
    (QuantSpec.fp8("e5m2", group_size=64), 22.0),
    (QuantSpec("fp16"), 60.0),
    (QuantSpec("bf16"), 45.0),
]


def _bound(spec: QuantSpec, qw: QuantizedWeight) -> torch.Tensor:
    """Elementwise worst-case |x − x'| for round-to-nearest in ``spec``."""
    x = grouped(W, spec)
    absmax = x.abs().amax(-1, keepdim=True)
    slack = absmax * 2e-3  # fp16 rounding of the stored scale
    if spec.format == "int":
        return (qw.scale.unsqueeze(-1) / 2 + slack).expand_as(x).reshape(W.shape)
    if spec.format in ("nf4", "fp4"):
        values = torch.tensor(NF4_VALUES if spec.format == "nf4" else FP4_VALUES)
        half_gap = (values[1:] - values[:-1]).max() / 2
        stored_absmax = qw.scale.unsqueeze(-1)  # ≥ the true absmax (fp16 rounding aside), never clips
        return (stored_absmax * half_gap + slack).expand_as(x).reshape(W.shape)
    if spec.format.startswith("fp8"):
        rel, sub = (2.0**-4, 2.0**-10) if spec.format == "fp8_e4m3" else (2.0**-3, 2.0**-17)
        return (x.abs() * rel + qw.scale.unsqueeze(-1) * sub).reshape(W.shape)
    rel = 2.0**-11 if spec.format == "fp16" else 2.0**-8
    return W.abs() * rel


@pytest.mark.parametrize("spec,min_sqnr", CASES, ids=[c[0].describe() for c in CASES])
def test_round_trip_error_bounds(spec: QuantSpec, min_sqnr: float) -> None:
    qw = quantize_tensor(W, spec)
    approx = qw.dequantize()
    assert approx.shape == W.shape
    assert ((W - approx).abs() <= _bound(spec, qw) + 1e-7).all()
    assert sqnr_db(W, approx) >= min_sqnr
    assert mse(W, approx) >= 0 and max_abs_error(W, approx) < 1.0


@pytest.mark.parametrize("spec,_", CASES, ids=[c[0].describe() for c in CASES])
def test_stored_layout_and_size(spec: QuantSpec, _: float) -> None:
    qw = quantize_tensor(W, spec)
    layout = stored_layout(spec, qw.shape)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qw.tensors.items()} == layout
    # a b-bit weight costs b bits plus its scale/zero overhead, nothing more
    overhead_bits = 8 * (qw.nbytes - qw.tensors["qdata"].numel() * qw.tensors["qdata"].element_size()) / qw.numel
    assert qw.bits_per_weight == pytest.approx(spec.bits + overhead_bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_symmetric_zero_point_is_zero(bits: int) -> None:
    qw = quantize_tensor(W, QuantSpec.int_(bits, 64, symmetric=True))
    assert torch.count_nonzero(qw.zero_point) == 0
    assert "zero" not in qw.tensors


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_zero_point_in_range_and_exact_zero(bits: int) -> None:
    w = W.clone()
    w[:, 5] = 0.0
    qw = quantize_tensor(w, QuantSpec.int_(bits, 64, symmetric=False))
    z = qw.zero_point
    assert z.min() >= 0 and z.max() <= (1 << bits) - 1
    assert torch.equal(qw.dequantize()[:, 5], torch.zeros(w.shape[0]))  # 0 is exactly representable


def test_asymmetric_formula() -> None:
    spec = QuantSpec.int_(4, 128, symmetric=False)
    qw = quantize_tensor(W, spec)
    s, z = qw.scale, qw.zero_point
    q = torch.clamp(torch.round(grouped(W, spec) / s.unsqueeze(-1) + z.unsqueeze(-1)), 0, 15)
    assert torch.allclose(((q - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(W.shape), qw.dequantize())


def test_nf4_double_quant_overhead_is_0_127_bits() -> None:
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    plain = quantize_tensor(w, QuantSpec.nf4(64, double_quant=False))
    dq = quantize_tensor(w, QuantSpec.nf4(64, double_quant=True))
    assert dq.bits_per_weight - 4 == pytest.approx(8 / 64 + 32 / (64 * 256), abs=1e-4)  # ≈ 0.127
    assert plain.bits_per_weight - 4 == pytest.approx(16 / 64)
    # the 8-bit scales cost almost nothing in accuracy
    assert sqnr_db(w, dq.dequantize()) > sqnr_db(w, plain.dequantize()) - 0.2


def test_nf4_table_equals_bitsandbytes() -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installable here")
    theirs = bnb_functional.get_4bit_type("nf4", device="cpu").float()
    assert torch.equal(torch.tensor(NF4_VALUES, dtype=torch.float32), theirs)


def test_nf4_quantization_matches_bitsandbytes() -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installable here")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = bnb_functional.dequantize_4bit(packed, state)
    ours = quantize_tensor(w, QuantSpec("nf4", 4, True, "group", 64, scale_dtype="float32")).dequantize()
    same = torch.isclose(ours, theirs, rtol=1e-5, atol=1e-6).float().mean().item()
    assert same > 0.999  # identical codes up to rounding ties at bucket boundaries


def test_fp8_stores_float8_bytes() -> None:
    qw = quantize_tensor(W, QuantSpec.fp8("e4m3"))
    assert qw.tensors["qdata"].dtype == torch.uint8
    assert qw.tensors["qdata"].view(torch.float8_e4m3fn).float().abs().max() <= 448


def test_spec_serialisation_round_trip() -> None:
    for spec, _ in CASES:
        assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("kwargs,match", [
    ({"format": "int", "bits": 9}, "out of range"),
    ({"format": "int", "bits": 1}, "out of range"),
    ({"format": "int7"}, "unknown format"),
    ({"format": "nf4", "bits": 8}, "has 4 bits"),
    ({"granularity": "row"}, "unknown granularity"),
    ({"granularity": "group", "group_size": 0}, "group_size"),
    ({"scale_dtype": "int8"}, "scale_dtype"),
    ({"granularity": "tensor", "double_quant": True}, "double_quant"),
])
def test_invalid_specs(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidSpecError, match=match):
        QuantSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(InvalidSpecError, match="unknown key"):
        QuantSpec.from_dict({"format": "int", "bitz": 4})


def test_group_size_must_divide_input_dim() -> None:
    with pytest.raises(ShapeError, match="layer.x: group_size 100 does not divide the input dimension 256"):
        quantize_tensor(W, QuantSpec.int_(4, 100), name="layer.x")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_weights_rejected_with_name(bad: float) -> None:
    w = W.clone()
    w[1, 1] = bad
    with pytest.raises(InvalidWeightError, match="model.layers.3.mlp.up_proj"):
        quantize_tensor(w, QuantSpec.int_(4, 64), name="model.layers.3.mlp.up_proj")


def test_fp16_scale_overflow_is_reported() -> None:
    with pytest.raises(InvalidWeightError, match="float32"):
        quantize_tensor(torch.full((2, 64), 1e7), QuantSpec.int_(4, 64))
    qw = quantize_tensor(torch.full((2, 64), 1e7), QuantSpec.int_(4, 64, scale_dtype="float32"))
    assert torch.allclose(qw.dequantize(), torch.full((2, 64), 1e7))
