"""Bit packing of unsigned codes along the last dimension.

Layout (little-endian within a group of 8 codes): every 8 consecutive codes of ``bits`` bits
occupy exactly ``bits`` bytes; code ``i`` of the group sits at bit offset ``i * bits`` of that
little-endian ``8 * bits``-bit word. For 4 bits this is the usual nibble packing (code 2j in the
low nibble of byte j), for 2 bits four codes per byte from the low bits up, for 8 bits identity.
Rows of fewer-than-8-bit codes are padded with zero codes up to a multiple of 8 codes.
"""

from __future__ import annotations

import torch

_ROW_CHUNK = 4096  # rows processed at once by the generic path (bounds the int64 temporaries)


def packed_row_bytes(num_codes: int, bits: int) -> int:
    """Bytes one row of ``num_codes`` codes takes when packed (8-bit codes are stored as is, unpadded)."""
    if bits == 8:
        return num_codes
    return (num_codes + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8, values < 2**bits, shape [..., K]) into uint8 [..., ceil(K/8)*bits]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dtype != torch.uint8:
        codes = codes.to(torch.uint8)
    *lead, k = codes.shape
    if bits == 8:
        return codes.contiguous()
    pad = (-k) % 8
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*lead, pad)], dim=-1)
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        c = codes.reshape(*lead, -1, per_byte)
        out = c[..., 0].clone()
        for i in range(1, per_byte):
            out |= c[..., i] << (i * bits)
        return out
    flat = codes.reshape(-1, codes.shape[-1])
    parts = [_pack_generic(flat[i : i + _ROW_CHUNK], bits) for i in range(0, flat.shape[0], _ROW_CHUNK)]
    packed = torch.cat(parts, dim=0) if parts else flat.new_zeros(0, (k + pad) // 8 * bits)
    return packed.reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [..., ceil(K/8)*bits] → uint8 codes [..., K] (K = num_codes)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(num_codes, bits):
        raise ValueError(f"packed rows have {nbytes} bytes; {num_codes} codes of {bits} bits need {packed_row_bytes(num_codes, bits)}")
    if bits == 8:
        return packed[..., :num_codes]
    if bits in (1, 2, 4):
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
        return torch.stack(parts, dim=-1).reshape(*lead, -1)[..., :num_codes]
    flat = packed.reshape(-1, nbytes)
    parts = [_unpack_generic(flat[i : i + _ROW_CHUNK], bits) for i in range(0, flat.shape[0], _ROW_CHUNK)]
    codes = torch.cat(parts, dim=0) if parts else flat.new_zeros(0, nbytes // bits * 8)
    return codes.reshape(*lead, -1)[..., :num_codes]


def _pack_generic(codes: torch.Tensor, bits: int) -> torch.Tensor:
    # codes: [R, 8n] uint8 → [R, n*bits]; each group of 8 codes forms one (8*bits ≤ 56)-bit word
    rows = codes.shape[0]
    groups = codes.reshape(rows, -1, 8).to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (groups << shifts).sum(dim=-1)  # [R, n]
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(rows, -1)


def _unpack_generic(packed: torch.Tensor, bits: int) -> torch.Tensor:
    rows = packed.shape[0]
    groups = packed.reshape(rows, -1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (groups << byte_shifts).sum(dim=-1)  # [R, n]
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(rows, -1)
