"""Autotuning policy shared by the Triton kernels.

Configs are keyed on (bucketed M, N, K) — and, automatically, the tensor dtypes — so each layer shape
is tuned once per process and cached. Under the Triton interpreter (``TRITON_INTERPRET=1``: CPU tests)
every config would be run, slowly, so a single small config is used instead; it is chosen to exercise
the awkward paths (split-K with a ragged last split, tiles that straddle scale groups).
``LOWBIT_TRITON_AUTOTUNE=0`` keeps only the first (default) GPU config, e.g. for quick GPU test runs.
"""

from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("LOWBIT_TRITON_AUTOTUNE", "1") != "0"


def pick(*families: list[triton.Config], interpret_config: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: every family's on a GPU (a kernel's prune hook then keeps the family
    that fits the call, e.g. float32 vs 16-bit inputs), each family's first one with autotuning off, and
    only ``interpret_config`` when interpreting."""
    if INTERPRET:
        return [interpret_config]
    return [c for family in families for c in (family if AUTOTUNE else family[:1])]


def keep(configs: list[triton.Config], family: list[triton.Config]) -> list[triton.Config]:
    """The configs of ``configs`` that belong to ``family`` (all of ``configs`` if none does)."""
    ids = {id(c) for c in family}
    return [c for c in configs if id(c) in ids] or configs


def m_bucket(m: int) -> int:
    """Autotune key for the number of rows M: the next power of two (prefill lengths share tuned configs)."""
    return 1 << max(0, (m - 1).bit_length())


def config(num_warps: int = 4, num_stages: int = 2, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)
