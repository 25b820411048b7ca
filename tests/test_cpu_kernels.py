"""The C++ CPU kernels (lowbit.kernels.cpu_lowbit) against the reference kernel over a shape grid.

Integer path (family ``cpu`` for inputs of ≤ 8 rows, or any size with a larger ``int_max_m``):
activations are quantized to int8 per 32 columns, so outputs differ from ``reference.linear`` by the
activation rounding: relative (Frobenius) error ≲ 1e-2 (typically 5e-3; nf4 8e-3, its codebook also
enters as int8). Exact path (larger inputs, inputs that require grad, family ``cpu_exact``, and
``dequantize``): equal to the reference up to fp32 rounding (dequantize: bit-exact).

The first test to run builds the kernels (~17-20 s on 2 busy cores, once per machine; cached).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.formats.spec import QuantSpec
from lowbit.kernels import dispatch, reference
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import QuantizedWeight

if shutil.which((os.environ.get("CXX") or "c++").split()[0]) is None:
    pytest.skip("no C++ compiler: the CPU kernels cannot be built here", allow_module_level=True)

from lowbit.kernels import cpu_lowbit  # noqa: E402  (builds the kernels on first use)
from lowbit.kernels.cpu_lowbit import ops  # noqa: E402

INT_TOL = 2e-2  # relative error of the int8-activation path vs the reference
EXACT_TOL = 1e-5

SPECS = [
    QuantSpec.int_(4, 32, True), QuantSpec.int_(4, 32, False), QuantSpec.int_(4, 64, True),
    QuantSpec.int_(4, 64, False), QuantSpec.int_(4, 128, True), QuantSpec.int_(4, 128, False),
    QuantSpec.int_(4, 96, False),  # a group of three 32-column blocks
    QuantSpec.int_(4, None, False), QuantSpec.int_(4, -1, True),
    QuantSpec.int_(4, 64, False, zero_dtype="float16"),  # HQQ-style real-valued zero-points
    QuantSpec.int_(4, 128, False, double_quant=True), QuantSpec.int_(4, 32, True, scale_dtype="bfloat16"),
    QuantSpec.int_(8, None, True), QuantSpec.int_(8, None, False), QuantSpec.int_(8, 32, True),
    QuantSpec.int_(8, 128, False), QuantSpec.int_(8, -1, True),
    QuantSpec.int_(2, 32, False), QuantSpec.int_(2, 128, True), QuantSpec.int_(3, 64, False),
    QuantSpec.int_(3, 32, True), QuantSpec.int_(5, 32, False), QuantSpec.int_(6, None, True),
    QuantSpec.nf4(64), QuantSpec.nf4(32, double_quant=True), QuantSpec.fp4(128),
]
# K: not multiples of 64 or 128 (96, 160), 192 with g64, 384 with g128; per-channel also odd K
SHAPES = [(17, 96), (40, 160), (257, 192), (33, 384), (5, 37)]
BATCHES = (1, 2, 3, 8, 17, 33)
ISAS = ("avx512", "avx2_vnni", "avx2", "scalar")


def _weight(spec: QuantSpec, n: int, k: int, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    return QuantizedWeight.from_float(torch.randn(n, k, generator=gen), spec)


def _fits(spec: QuantSpec, k: int) -> bool:
    return spec.granularity != "group" or (spec.group_size is not None and k % spec.group_size == 0)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_int_path_matches_reference(spec: QuantSpec) -> None:
    shapes = [(n, k) for n, k in SHAPES if _fits(spec, k)]
    assert shapes
    for i, (n, k) in enumerate(shapes):
        qw = _weight(spec, n, k, seed=i)
        assert cpu_lowbit.supports(qw)
        prepared = cpu_lowbit.prepare(qw, int_max_m=1 << 30)  # int8 activations at every batch size
        assert torch.equal(ops.dequantize(prepared), qw.dequantize())
        gen = torch.Generator().manual_seed(100 + i)
        for j, m in enumerate(BATCHES):
            bias = torch.randn(n, generator=gen) if j % 2 else None
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=gen).to(dtype)
                y = ops.linear(x, prepared, bias)
                ref = reference.linear(x.float(), qw, bias).to(dtype)  # fp32 oracle, then x's dtype
                assert y.dtype == dtype and y.shape == (m, n)
                tol = INT_TOL if dtype == torch.float32 else INT_TOL + 1e-2
                assert _rel(y, ref) < tol, (spec.describe(), n, k, m, dtype, _rel(y, ref))


@pytest.mark.parametrize("spec", [QuantSpec.int_(4, 128, False), QuantSpec.int_(8, None, True), QuantSpec.nf4(64),
                                  QuantSpec.int_(3, 32, False), QuantSpec.int_(4, None, False)],
                         ids=lambda s: s.describe())
def test_exact_path_matches_reference(spec: QuantSpec) -> None:
    for i, (n, k) in enumerate((n, k) for n, k in SHAPES if _fits(spec, k)):
        qw = _weight(spec, n, k, seed=i)
        exact = cpu_lowbit.prepare(qw, int_max_m=0)
        for m in (1, 17):
            bias = torch.randn(n)
            x = torch.randn(m, k)
            assert _rel(ops.linear(x, exact, bias), reference.linear(x, qw, bias)) < EXACT_TOL
            xb = x.bfloat16()  # bf16: dequantized weight and matmul in bf16, like the reference
            assert _rel(ops.linear(xb, exact, bias), reference.linear(xb, qw, bias)) < 1e-2


@pytest.mark.parametrize("spec", [QuantSpec.int_(4, 64, False), QuantSpec.int_(8, 32, False), QuantSpec.nf4(64),
                                  QuantSpec.fp4(32), QuantSpec.int_(2, 32, True), QuantSpec.int_(3, 64, False),
                                  QuantSpec.int_(6, None, False)],
                         ids=lambda s: s.describe())
def test_every_isa_computes_the_same(spec: QuantSpec) -> None:
    """AVX-512, AVX-VNNI, AVX2 and scalar share the integer arithmetic: equal up to fp32 summation order.
    (An ISA this CPU lacks runs the best available one instead.)"""
    qw = _weight(spec, 40, 192)
    x, bias = torch.randn(5, 192), torch.randn(40)
    outputs = {isa: ops.linear(x, cpu_lowbit.prepare(qw, isa=isa), bias) for isa in ISAS}
    for isa, y in outputs.items():
        assert torch.allclose(y, outputs["scalar"], rtol=1e-5, atol=1e-4), isa
        assert torch.equal(ops.dequantize(cpu_lowbit.prepare(qw, isa=isa)), qw.dequantize()), isa


def test_default_uses_int8_activations_for_decode_sized_batches_only() -> None:
    qw = _weight(QuantSpec.int_(4, 64, False), 40, 192)
    prepared = cpu_lowbit.prepare(qw)
    assert prepared.int_max_m == cpu_lowbit.layout.INT_MAX_M
    for m in (1, prepared.int_max_m, prepared.int_max_m + 1, 40):
        x = torch.randn(m, 192)
        err = _rel(ops.linear(x, prepared), reference.linear(x, qw))
        assert (EXACT_TOL < err < INT_TOL) if m <= prepared.int_max_m else err < EXACT_TOL, (m, err)


def test_quant_linear_selects_cpu_kernel_and_backward_works() -> None:
    spec = QuantSpec.int_(4, 64, False)
    layer = QuantLinear.from_weight(_weight(spec, 40, 192), torch.randn(40))
    assert layer.kernel_name == "cpu"
    x = torch.randn(2, 3, 192, requires_grad=True)  # leading dims are flattened and restored
    y = layer(x)
    assert y.shape == (2, 3, 40)
    assert _rel(y.detach(), reference.linear(x.detach(), layer.weight, layer.bias)) < EXACT_TOL  # x requires grad
    assert _rel(layer(x.detach()), y.detach()) < INT_TOL
    y.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, layer.weight.dequantize().sum(0).expand(2, 3, 192), atol=1e-5)
    with dispatch.force_kernel("cpu_exact"):
        layer.reset_kernel()
        assert layer.kernel_name == "cpu_exact"
        assert _rel(layer(x.detach()), reference.linear(x.detach(), layer.weight, layer.bias)) < EXACT_TOL
    layer.reset_kernel()


@pytest.mark.parametrize("spec", [QuantSpec.int_(4, 16, True), QuantSpec.int_(4, 48, False), QuantSpec.nf4(16),
                                  QuantSpec.fp8(), QuantSpec("fp16")], ids=lambda s: s.describe())
def test_unsupported_specs_use_reference(spec: QuantSpec) -> None:
    qw = _weight(spec, 24, 96)
    assert not cpu_lowbit.supports(qw)
    assert dispatch.select_weight_kernel(qw, "cpu").name == "reference"
    layer = QuantLinear.from_weight(qw)
    assert layer.kernel_name == "reference"
    x = torch.randn(3, 96)
    assert torch.allclose(layer(x), reference.linear(x, qw), atol=1e-5)


def test_empty_batch_and_prepared_size() -> None:
    qw = _weight(QuantSpec.int_(4, 128, False), 64, 256)
    prepared = cpu_lowbit.prepare(qw)
    assert ops.linear(torch.randn(0, 256), prepared).shape == (0, 64)
    assert prepared.codes.numel() == qw.tensors["qdata"].numel()  # int4: the repacked codes are no larger
    assert prepared.scale.dtype == torch.float16  # fp16 scales/zero-points are kept in fp16


def test_torch_compile_fullgraph() -> None:
    qw = _weight(QuantSpec.int_(4, 32, False), 24, 64)
    prepared = cpu_lowbit.prepare(qw)
    bias = torch.randn(24)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(ops.linear(x, prepared, bias)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")  # graph capture; no C++ codegen needed
    x = torch.randn(3, 64)
    assert torch.allclose(compiled(x), f(x))


def test_torch_compile_inductor_quant_linear() -> None:
    layer = QuantLinear.from_weight(_weight(QuantSpec.nf4(64), 24, 128), torch.randn(24))
    layer.prepare_kernel()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 128)
    assert torch.allclose(compiled(x), layer(x), atol=1e-5)


def test_packed_weight_is_one_tensor_with_checked_header() -> None:
    qw = _weight(QuantSpec.nf4(64), 40, 192)
    prepared = cpu_lowbit.prepare(qw)
    assert prepared.packed.dtype == torch.uint8 and prepared.packed.dim() == 1
    # the section views share the packed tensor's memory
    base = prepared.packed.data_ptr()
    for view in (prepared.codes, prepared.scale, prepared.zero, prepared.lut, prepared.table):
        assert base <= view.data_ptr() < base + prepared.packed.numel()
    assert prepared.lut.numel() == 16 and prepared.table.numel() == 16
    x = torch.randn(2, 192)
    bad = prepared.packed.clone()
    bad[0] ^= 0xFF  # magic
    with pytest.raises(RuntimeError, match="bad header"):
        torch.ops.lowbit_cpu.qlinear(x, bad, None, prepared.kind, 40, 192, prepared.group_size, prepared.out_scale,
                                     8, 0)
    huge = prepared.packed.clone()
    huge[8:16] = torch.tensor([2**62], dtype=torch.int64).view(torch.uint8)  # a garbage codes offset
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.lowbit_cpu.qlinear(x, huge, None, prepared.kind, 40, 192, prepared.group_size, prepared.out_scale,
                                     8, 0)
    with pytest.raises(RuntimeError, match="does not fit"):  # a truncated weight is refused, not read past
        torch.ops.lowbit_cpu.qlinear(x, prepared.packed[:-64].clone(), None, prepared.kind, 40, 192,
                                     prepared.group_size, prepared.out_scale, 8, 0)
    with pytest.raises(RuntimeError, match="does not fit"):  # the header of a smaller layer
        torch.ops.lowbit_cpu.qlinear(torch.randn(2, 384), prepared.packed, None, prepared.kind, 40, 384,
                                     prepared.group_size, prepared.out_scale, 8, 0)


def test_cpp_wrapper_calls_the_c_shim() -> None:
    """Inductor's C++ wrapper calls qlinear through its C shim (no boxed dispatcher) and matches eager."""
    from torch._inductor.utils import run_and_get_cpp_code

    layer = QuantLinear.from_weight(_weight(QuantSpec.int_(4, 32, False), 24, 64), torch.randn(24))
    layer.prepare_kernel()
    compiled = torch.compile(layer, fullgraph=True, options={"cpp_wrapper": True,
                                                             "aot_inductor.custom_ops_to_c_shims": ops.C_SHIMS})
    x = torch.randn(1, 64)
    out, code = run_and_get_cpp_code(compiled, x)
    assert "aoti_torch_cpu_qlinear(" in code and "aoti_torch_call_dispatcher" not in code
    assert torch.allclose(out, layer(x), atol=1e-5)


@pytest.mark.slow
def test_concurrent_first_builds_are_safe(tmp_path: Path) -> None:
    """Two processes building into an empty extensions directory at once: one compiles, one waits."""
    code = ("import torch; from lowbit.kernels.cpu_lowbit.build import load_library; load_library(); "
            "print(torch.ops.lowbit_cpu.isa())")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert out.strip() in {"1", "2", "3", "4"}


def test_exact_path_under_inference_mode() -> None:
    """The exact path runs ATen ops on worker threads: they must see the caller's inference mode."""
    qw = _weight(QuantSpec.int_(4, 128, False), 160, 8192)  # 10 tiles in chunks of 4: several tasks
    exact = cpu_lowbit.prepare(qw, int_max_m=0)
    x = torch.randn(4, 8192)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y = ops.linear(x, exact)
    finally:
        torch.set_num_threads(threads)
    assert _rel(y, reference.linear(x, qw)) < EXACT_TOL
