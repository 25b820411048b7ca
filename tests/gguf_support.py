"""Helpers for the GGUF tests and benches: llama.cpp (llama-cpp-python) as the real client."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping full windows of ``ids`` (what lowbit's perplexity scores), as lists."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seq_len:(i + 1) * seq_len].tolist() for i in range(n)]


def open_llama(llama_cpp, path: Path, n_ctx: int, *, vocab_only: bool = False):
    """llama.cpp with an F32 KV cache (its default F16 cache rounds keys/values: ~1e-3 logit noise)."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, n_batch=n_ctx,
                           verbose=False, vocab_only=vocab_only, seed=0, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32)


def llama_logits(llm, window: list[int]) -> np.ndarray:
    """[L, V] float32 logits llama.cpp computes for one window (fresh context)."""
    llm.reset()
    llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
    llm.eval(window)
    return np.array(llm.scores[: len(window)], dtype=np.float32)


def nll_sum(logits: np.ndarray, window: list[int]) -> tuple[float, int]:
    x = torch.from_numpy(logits[:-1]).double()
    target = torch.tensor(window[1:])
    return float(torch.nn.functional.cross_entropy(x, target, reduction="sum")), len(window) - 1


def llama_cpp_ppl(llm, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for w in windows:
        s, c = nll_sum(llama_logits(llm, w), w)
        total, count = total + s, count + c
    return math.exp(total / count)


@torch.no_grad()
def lowbit_ppl(model, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=torch.tensor([w])).logits[0].float().numpy()
        s, c = nll_sum(logits, w)
        total, count = total + s, count + c
    return math.exp(total / count)


def llama_cpp_quantize(llama_cpp, src: Path, dst: Path, ftype_name: str, threads: int = 2) -> None:
    """llama.cpp's own quantizer (llama-quantize) through the C API: ``ftype_name`` e.g. 'MOSTLY_Q4_K_M'."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}")
    params.nthread = threads
    import ctypes

    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def gguf_tensor_types(path: Path) -> dict[str, str]:
    from lowbit.io.gguf.reader import read_gguf
    import gguf

    g = read_gguf(path)
    return {name: gguf.GGMLQuantizationType(int(t.ggml_type)).name for name, t in g.tensors.items()}


def overwrite(path: Path, blob: bytes) -> None:
    """Replace a file's bytes in place (``write_bytes`` truncates to 0 first, which on ext4 flushes to disk:
    milliseconds per call)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, blob)
        os.ftruncate(fd, len(blob))
    finally:
        os.close(fd)
