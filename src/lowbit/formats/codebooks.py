"""4-bit codebooks, ascending, normalised to [-1, 1]."""

from __future__ import annotations

import torch

# NormalFloat4 (QLoRA, Dettmers et al. 2023): quantiles of N(0,1) normalised to [-1, 1], with an
# exact zero. Same 16 values, in the same order, as bitsandbytes' NF4 table (index i ↔ value i).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230425834656, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 E2M1 (OCP microscaling): magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, here divided by 6 so the
# block absmax maps to ±1. Both signed zeros are kept so the table has 16 entries like the bit format.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = tuple(sorted([-v / 6 for v in _E2M1] + [v / 6 for v in _E2M1]))


def codebook(fmt: str) -> torch.Tensor:
    """fp32 tensor [16] of the format's code values (ascending)."""
    if fmt == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if fmt == "fp4":
        return torch.tensor(FP4_VALUES, dtype=torch.float32)
    raise KeyError(fmt)
