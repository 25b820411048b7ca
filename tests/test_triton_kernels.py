"""Triton kernels (kernels/triton/) against the reference kernels, over a grid of formats and shapes.

Runs on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set below before Triton is
imported); with ``TRITON_INTERPRET=0`` on a CUDA machine the same checks run the compiled kernels
(add ``LOWBIT_TRITON_AUTOTUNE=0`` to skip autotuning). Skipped when Triton is not installed.

Oracle: ``reference.linear`` / ``reference.linear_w8a8`` computed in float32. Tolerances, as the max
error relative to the largest output magnitude: float32 activations 1e-4 (both sides accumulate in
float32; only the summation order differs), float16 1e-2 and bfloat16 2e-2 (the output itself is
rounded to 11/8 significant bits). Dequantization and activation codes must match exactly.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (optional GPU dependency)")

import lowbit.kernels.triton as lt  # noqa: E402
from lowbit.formats.act import ActSpec  # noqa: E402
from lowbit.formats.primitives import scale_shape  # noqa: E402
from lowbit.formats.spec import QuantSpec  # noqa: E402
from lowbit.kernels import dispatch, reference  # noqa: E402
from lowbit.kernels.base import PreparedLinear  # noqa: E402
from lowbit.kernels.triton import tuning  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.tensor import QuantizedWeight  # noqa: E402

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if INTERPRETED and not tuning.INTERPRET:
    pytest.skip("lowbit.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
M_VALUES = (1, 2, 5, 16, 33)  # GEMV (broadcast rows), split-K tl.dot (5, 16) and the GEMM (33)

# (id, spec, N, K, float zero-points?) — odd N, K not a multiple of the kernels' BLOCK_K, every group
# size, bit width, zero-point kind and codebook; shapes small enough for the interpreter.
CASES = [
    ("int4-g32-sym", QuantSpec.int_(4, 32), 17, 96),
    ("int4-g64-asym", QuantSpec.int_(4, 64, symmetric=False), 40, 192),
    ("int4-g128-asym", QuantSpec.int_(4, 128, symmetric=False), 17, 384),
    ("int4-g48-sym", QuantSpec.int_(4, 48), 25, 96),  # group size that is not a power of two
    ("int4-ch-sym", QuantSpec.int_(4, None), 40, 160),
    ("int4-t-asym", QuantSpec.int_(4, -1, symmetric=False), 17, 96),
    ("int4-g32-dq", QuantSpec.int_(4, 32, double_quant=True), 100, 96),  # 300 scales: two double-quant blocks
    ("int4-g64-bf16-scale", QuantSpec.int_(4, 64, scale_dtype="bfloat16"), 17, 192),
    ("int2-g32-asym", QuantSpec.int_(2, 32, symmetric=False), 40, 160),
    ("int2-g64-sym", QuantSpec.int_(2, 64), 17, 192),
    ("int3-g32-sym", QuantSpec.int_(3, 32), 17, 96),
    ("int3-g128-asym", QuantSpec.int_(3, 128, symmetric=False), 40, 384),
    ("int5-g32-asym", QuantSpec.int_(5, 32, symmetric=False), 17, 160),
    ("int6-ch-sym", QuantSpec.int_(6, None), 40, 96),
    ("int8-ch-sym", QuantSpec.int_(8, None), 17, 160),
    ("int8-g64-asym", QuantSpec.int_(8, 64, symmetric=False), 40, 192),
    ("int8-t-sym-f32-scale", QuantSpec.int_(8, -1, scale_dtype="float32"), 17, 96),
    ("int4-g32-fz16", QuantSpec.int_(4, 32, symmetric=False, zero_dtype="float16"), 17, 96),
    ("int4-g64-fzbf16", QuantSpec.int_(4, 64, symmetric=False, zero_dtype="bfloat16"), 40, 192),
    ("int3-g128-fz32", QuantSpec.int_(3, 128, symmetric=False, zero_dtype="float32"), 17, 384),
    ("int2-ch-fz16-dq", QuantSpec.int_(2, None, symmetric=False, zero_dtype="float16", double_quant=True), 17, 96),
    ("nf4-b64", QuantSpec.nf4(64), 40, 192),
    ("nf4-b32-dq", QuantSpec.nf4(32, double_quant=True), 100, 96),
    ("nf4-b128", QuantSpec.nf4(128), 17, 384),
    ("fp4-b64", QuantSpec.fp4(64), 17, 192),
    ("fp4-b128-dq", QuantSpec.fp4(128, double_quant=True), 40, 384),
    ("fp8-e4m3-ch", QuantSpec.fp8("e4m3"), 17, 96),
    ("fp8-e5m2-g32", QuantSpec.fp8("e5m2", 32), 40, 160),
]


def _weight(spec: QuantSpec, n: int, k: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if spec.float_zero:  # HQQ-style real-valued zero-points, not just integers stored as floats
        r, c = scale_shape((n, k), spec)
        scale = torch.rand(r, c, generator=g) * 0.3 + 0.05
        zero = torch.rand(r, c, generator=g) * ((1 << spec.bits) - 1)
        return QuantizedWeight.from_qparams(w, spec, scale, zero).to(DEVICE)
    return QuantizedWeight.from_float(w, spec).to(DEVICE)


def _assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOL[dtype] * scale + 1e-6, f"max error {err:.3g} vs output magnitude {scale:.3g} ({dtype})"


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request: pytest.FixtureRequest) -> tuple[QuantizedWeight, lt.TritonWeight]:
    _, spec, n, k = request.param
    qw = _weight(spec, n, k)
    assert lt.supports(qw)
    return qw, lt.prepare(qw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_apply_matches_reference(case: tuple[QuantizedWeight, lt.TritonWeight], dtype: torch.dtype) -> None:
    qw, prepared = case
    n, k = qw.shape
    g = torch.Generator().manual_seed(1)
    for i, m in enumerate(M_VALUES):
        x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
        bias = torch.randn(n, generator=g).to(DEVICE) if i % 2 == 0 else None
        y = lt.apply(x, prepared, bias)
        assert y.shape == (m, n) and y.dtype == dtype
        _assert_close(y, reference.linear(x.float(), qw, bias), dtype)


def test_dequantize_matches_exactly(case: tuple[QuantizedWeight, lt.TritonWeight]) -> None:
    qw, prepared = case
    for dtype in (torch.float32, torch.float16):
        torch.testing.assert_close(lt.dequantize(prepared, dtype), qw.dequantize(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("m", [2, 10], ids=["gemv", "gemm"])
def test_bf16_batched_and_strided_inputs(m: int) -> None:
    if INTERPRETED and 2 * m > 4:
        pytest.skip("the Triton interpreter's tl.dot multiplies the raw uint16 storage of bfloat16 operands")
    qw = _weight(QuantSpec.int_(4, 64, symmetric=False), 40, 192)
    prepared = lt.prepare(qw)
    x = torch.randn(2, m, 2 * 192).to(DEVICE, torch.bfloat16)[..., ::2]  # [2, m, 192], non-contiguous
    bias = torch.randn(40, dtype=torch.bfloat16).to(DEVICE)
    y = lt.apply(x, prepared, bias)
    assert y.shape == (2, m, 40) and y.dtype == torch.bfloat16
    _assert_close(y, reference.linear(x.float(), qw, bias.float()), torch.bfloat16)
    assert lt.apply(x[:, :0], prepared, bias).shape == (2, 0, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_through_quant_linear(dtype: torch.dtype) -> None:
    qw = _weight(QuantSpec.nf4(32, double_quant=True), 40, 96)
    bias = torch.randn(40).to(DEVICE)
    calls = {"dequantize": 0}

    def counting_dequantize(state: lt.TritonWeight, out_dtype: torch.dtype) -> torch.Tensor:
        calls["dequantize"] += 1
        return lt.dequantize(state, out_dtype)

    kernel = dataclasses.replace(lt.TRITON_KERNEL, dequantize=counting_dequantize)
    layer = QuantLinear.from_weight(qw, bias)
    layer._prepared = PreparedLinear(kernel, kernel.prepare(layer.weight), layer.weight)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 96, generator=g).to(DEVICE, dtype).requires_grad_()
    grad_out = torch.randn(2, 3, 40, generator=g).to(DEVICE, dtype)
    y = layer(x)
    y.backward(grad_out)
    x_ref = x.detach().float().requires_grad_()
    y_ref = reference.linear(x_ref, qw, layer.bias)
    y_ref.backward(grad_out.float())
    assert calls["dequantize"] == 1
    _assert_close(y, y_ref, dtype)
    assert x.grad is not None and x.grad.dtype == dtype and x_ref.grad is not None
    _assert_close(x.grad, x_ref.grad, dtype)


ACT_SPECS = [ActSpec.dynamic_per_token(), ActSpec.dynamic_per_token(symmetric=False),
             ActSpec.dynamic_per_token(bits=4), ActSpec(8, True, "tensor", True), ActSpec(6, False, "tensor", True),
             ActSpec.static(), ActSpec.static(symmetric=False)]


@pytest.mark.parametrize("act_spec", ACT_SPECS, ids=[a.describe() for a in ACT_SPECS])
@pytest.mark.parametrize("granularity", [None, -1], ids=["w-ch", "w-t"])
def test_w8a8_matches_reference(act_spec: ActSpec, granularity: int | None) -> None:
    qw = _weight(QuantSpec.int_(8, granularity), 40, 160)
    assert lt.supports_w8a8(qw, act_spec)
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.02]).to(DEVICE)
    zero = torch.tensor([0.0 if act_spec.symmetric else 90.0]).to(DEVICE)
    for i, (m, dtype) in enumerate([(1, torch.float32), (5, torch.float16), (33, torch.float32)]):
        x = (torch.randn(m, 160, generator=g) + (0.0 if act_spec.symmetric else 0.7)).to(DEVICE, dtype)
        bias = torch.randn(40, generator=g).to(DEVICE) if i != 1 else None
        codes, _, _ = lt.w8a8.quantize_activation(x.float(), act_spec, scale, zero)
        ref_codes, _, _ = reference.quantize_activation(x.float(), act_spec, scale, zero)
        torch.testing.assert_close(codes.float() + (0 if act_spec.symmetric else 128), ref_codes, rtol=0, atol=0)
        y = lt.linear_w8a8(x, qw, bias, act_spec, scale, zero)
        assert y.dtype == dtype
        _assert_close(y, reference.linear_w8a8(x.float(), qw, bias, act_spec, scale, zero), dtype)


def test_w8a8_gradient_and_unsupported_specs() -> None:
    qw = _weight(QuantSpec.int_(8, None), 17, 96)
    act_spec = ActSpec.dynamic_per_token()
    x = torch.randn(3, 96).to(DEVICE).requires_grad_()
    lt.linear_w8a8(x, qw, None, act_spec).sum().backward()  # straight-through, via the reference
    torch.testing.assert_close(x.grad, qw.dequantize().sum(0).expand(3, -1))
    assert not lt.supports_w8a8(qw, ActSpec.llm_int8())
    assert not lt.supports_w8a8(_weight(QuantSpec.int_(8, 32), 17, 96), act_spec)
    assert not lt.supports_w8a8(_weight(QuantSpec.int_(4, None), 17, 96), act_spec)


def test_registered_for_cuda_dispatch() -> None:
    qw = _weight(QuantSpec.int_(4, 32), 17, 96)
    if os.environ.get("LOWBIT_KERNEL") in (None, "", "triton"):
        assert dispatch.select_weight_kernel(qw, "cuda") is lt.TRITON_KERNEL
    assert not lt.supports(_weight(QuantSpec("fp16"), 17, 96))
    qw8 = _weight(QuantSpec.int_(8, None), 17, 96)
    assert dispatch.linear_kernel(qw8, torch.device("cuda"), ActSpec.dynamic_per_token()) is lt.linear_w8a8
    assert dispatch.linear_kernel(qw8, torch.device("cuda"), ActSpec.llm_int8()) is reference.linear_w8a8
