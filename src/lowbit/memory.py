"""Give freed memory back to the operating system between large steps (block-by-block work)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

import torch

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(_libc, "malloc_trim"):  # musl and others
            _libc = None
    except OSError:
        _libc = None


def release_memory() -> None:
    """Collect garbage, empty the CUDA cache and trim glibc's heap.

    Without the trim, glibc keeps the freed float weights of every processed block in its arenas
    (fragmentation), and peak RSS grows by about one block per block.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _libc is not None:
        _libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3


def return_large_allocations_to_os(threshold_bytes: int = 1 << 20) -> None:
    """Serve allocations above ``threshold_bytes`` with their own mmap (glibc), freed straight back to the OS.

    glibc otherwise raises this threshold dynamically (up to 32 MB) after big frees, and later
    block-sized tensors then come from a fragmented heap that is never returned.
    """
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
