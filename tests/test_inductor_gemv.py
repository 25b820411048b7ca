"""OneRowMatmulPass: one-row float32 mm/addmm become reductions with the same result; others stay."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lowbit.kernels.inductor_gemv import OneRowMatmulPass

aten = torch.ops.aten


def _traced(fn, *args):  # noqa: ANN001, ANN202
    gm = make_fx(fn, tracing_mode="fake", pre_dispatch=False)(*args)
    return gm


def _targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_linear_is_rewritten_and_equal(bias: bool) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(1, 96), torch.randn(40, 96)
    b = torch.randn(40) if bias else None
    gm = _traced(lambda x, w, b: torch.nn.functional.linear(x, w, b), x, w, b)
    assert _targets(gm) & {aten.mm.default, aten.addmm.default}
    OneRowMatmulPass()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert not _targets(gm) & {aten.mm.default, aten.addmm.default}
    assert aten.sum.dim_IntList in _targets(gm)
    torch.testing.assert_close(gm(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, dtype", [(3, torch.float32), (1, torch.bfloat16)], ids=["3-rows", "bf16"])
def test_other_matmuls_are_left_to_aten(rows: int, dtype: torch.dtype) -> None:
    x, w = torch.randn(rows, 64, dtype=dtype), torch.randn(32, 64, dtype=dtype)
    gm = _traced(lambda x, w: x @ w.t(), x, w)
    OneRowMatmulPass()(gm.graph)
    assert aten.mm.default in _targets(gm)


def test_compiled_with_the_pass_matches_eager() -> None:
    torch.manual_seed(1)
    layer = torch.nn.Linear(256, 300)
    x = torch.randn(1, 1, 256)
    compiled = torch.compile(layer, dynamic=False, options={"post_grad_custom_pre_pass": OneRowMatmulPass()})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
