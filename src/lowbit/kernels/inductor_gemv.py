"""An Inductor graph pass for CPU decode: one-row float32 matmuls become parallel reductions.

A decode step multiplies one activation row by every float weight that is left (the LM head, any
layer kept in float, every layer of a float model). Inductor hands ``mm``/``addmm`` to ATen, whose
one-row case on CPU runs a general GEMM on one thread (and, for ``x @ W.T``, re-packs W on every
call): 170 µs for the demo model's 4096×256 head, 2.3 ms for a 4096×2048 one. Written as
``sum(xᵀ * W.T, dim=0)``, the same product is an Inductor reduction over K, generated as vectorised
C++ and split over the output rows across threads: 3× faster at both sizes, close to the memory
bandwidth. Only ``[1, K] @ [K, N]`` float32 products on the CPU are rewritten (reduced-precision
inputs keep ATen, whose accumulation is wider); results differ from ATen's by summation order only.

Used by :class:`lowbit.generate.Generator` through Inductor's ``post_grad_custom_pre_pass`` option,
so it applies to the decode step it compiles and to nothing else in the process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _is_cpu_f32(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype == torch.float32


def _one_row_product(node: fx.Node) -> tuple[fx.Node, fx.Node, Any] | None:
    """(x [1, K], w [K, N], bias or None) when ``node`` is a rewritable one-row mm/addmm."""
    if node.target is aten.mm.default:
        x, w, bias = node.args[0], node.args[1], None
    elif node.target is aten.addmm.default and not node.kwargs and len(node.args) == 3:
        bias, x, w = node.args  # addmm with beta = alpha = 1 (a Linear with a bias)
    else:
        return None
    xv, wv = _val(x), _val(w)
    if not (_is_cpu_f32(xv) and _is_cpu_f32(wv)) or xv.dim() != 2 or wv.dim() != 2:
        return None
    if not all(isinstance(d, int) for d in (*xv.shape, *wv.shape)) or xv.shape[0] != 1:
        return None  # dynamic shapes or more than one row: ATen's GEMM is the right kernel
    if bias is not None and not _is_cpu_f32(_val(bias)):
        return None
    return x, w, bias


def _fake(op: Any, *args: Any) -> Any:
    """The op's output metadata, computed on the inputs' fake tensors."""
    values = [_val(a) for a in args]
    mode = torch._guards.detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with mode:
        return op(*values)


def _emit(graph: fx.Graph, op: Any, *args: Any) -> fx.Node:
    node = graph.call_function(op, args)
    node.meta["val"] = _fake(op, *args)
    return node


class OneRowMatmulPass(CustomGraphPass):
    """Rewrites ``mm(x[1, K], w[K, N])`` (and ``addmm`` with a bias) as ``sum(xᵀ * w, 0)``."""

    def __call__(self, graph: fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            match = _one_row_product(node)
            if match is None:
                continue
            x, w, bias = match
            with graph.inserting_before(node):
                column = _emit(graph, aten.permute.default, x, [1, 0])  # [K, 1]
                products = _emit(graph, aten.mul.Tensor, column, w)  # [K, N]
                out = _emit(graph, aten.sum.dim_IntList, products, [0], True)  # [1, N]
                if bias is not None:
                    out = _emit(graph, aten.add.Tensor, out, bias)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))
