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


def trim_heap() -> None:
    """Give glibc's free heap pages back to the OS (no garbage collection; cheap enough per training step).

    A training step frees and re-allocates hundreds of MB of activations; without trimming, glibc's
    arenas keep the freed pages and fragmentation raises the resident peak step after step.
    """
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


# ---- a memory cap (--max-memory) ----------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_budget: int | None = None


def parse_size(text: str | int) -> int:
    """``"1.5GB"``, ``"800MiB"``, ``"2g"`` or a byte count → bytes (decimal units unless ``…iB``)."""
    from lowbit.errors import InvalidSpecError

    if isinstance(text, int):
        value = text
    else:
        import re

        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise InvalidSpecError(f"cannot read the size {text!r}; write e.g. 1.5GB, 800MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidSpecError(f"a memory size must be positive, got {text!r}")
    return value


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # best available: the peak
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return 0


def peak_rss() -> int | None:
    """Peak resident set size of this process in bytes (Linux VmHWM; None where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class memory_budget:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, long-running work checks the process's RSS against ``limit`` bytes.

    ``check_budget`` raises :class:`~lowbit.errors.MemoryBudgetError` once the RSS exceeds it, and
    ``require`` refuses work whose estimated peak would — before it starts.
    """

    def __init__(self, limit: int | str | None) -> None:
        self.limit = None if limit is None else parse_size(limit)

    def __enter__(self) -> "memory_budget":
        global _budget
        self._previous, _budget = _budget, self.limit
        return self

    def __exit__(self, *exc: object) -> None:
        global _budget
        _budget = self._previous


def budget_limit() -> int | None:
    return _budget


def check_budget(where: str) -> None:
    """Raise MemoryBudgetError if the RSS is over the active cap (no-op without one)."""
    if _budget is None:
        return
    rss = current_rss()
    if rss > _budget:
        from lowbit.errors import MemoryBudgetError

        raise MemoryBudgetError(f"memory use {format_bytes(rss)} exceeds --max-memory {format_bytes(_budget)} "
                                f"{where}; lower --calib-samples/--calib-seq-len or raise the cap")


def require(extra_bytes: int, what: str) -> None:
    """Refuse work expected to need ``extra_bytes`` beyond the current RSS when that passes the cap."""
    if _budget is None:
        return
    rss = current_rss()
    if rss + extra_bytes > _budget:
        from lowbit.errors import MemoryBudgetError

        raise MemoryBudgetError(f"{what} needs about {format_bytes(rss + extra_bytes)} (now {format_bytes(rss)} "
                                f"+ {format_bytes(extra_bytes)}), over --max-memory {format_bytes(_budget)}; "
                                "lower --calib-samples/--calib-seq-len or raise the cap")


def format_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
