"""Device helpers shared by the Triton kernels: dequantize a weight tile, GEMM tile order, rounding.

Everything here is ``@triton.jit`` and inlined into the calling kernels; the layout it reads is the
one :func:`lowbit.kernels.triton.layout.prepare` writes (see :class:`~lowbit.kernels.triton.layout.TritonWeight`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequant_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, k0, offs_k, offs_n, N, K,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZERO: tl.constexpr,
                 ZERO_CONST: tl.constexpr, USE_LUT: tl.constexpr):
    """Wᵀ tile [BLOCK_K, BLOCK_N] in float32: rows ``offs_k`` (= k0 + arange(BLOCK_K)), columns ``offs_n``.

    ``codes_ptr``: int32 [KW, N]; word ``k // CPW`` of column n holds code k at bit ``(k % CPW) * BITS``.
    ``scale_ptr``/``zero_ptr``: [num_groups, N] (any float dtype; zero also uint8), group of k = k // GROUP,
    or a single group when GROUP == 0 (per-channel/per-tensor). Columns ≥ N come back as 0; rows ≥ K are
    finite but arbitrary, so callers must zero the matching activations (or mask the store).
    Affine formats: w = (q − z)·s with z = ZERO_CONST when there is no zero tensor. Codebook formats:
    w = lut[q]·s.
    """
    CPW: tl.constexpr = 32 // BITS
    mask_n = offs_n < N
    mask = (offs_k < K)[:, None] & mask_n[None, :]
    if (CPW & (CPW - 1)) == 0:
        # 2/4/8-bit: load each word once, [BLOCK_K // CPW, BLOCK_N], and expand it in registers to its
        # CPW codes: [KW, CPW, BLOCK_N] reshaped row-major to [BLOCK_K, BLOCK_N] puts code j of word kw
        # at row kw·CPW + j — exactly its k (k0 is a multiple of BLOCK_K, hence of CPW).
        offs_w = k0 // CPW + tl.arange(0, BLOCK_K // CPW)
        word_mask = (offs_w < tl.cdiv(K, CPW))[:, None] & mask_n[None, :]
        word = tl.load(codes_ptr + offs_w[:, None] * N + offs_n[None, :], mask=word_mask, other=0)
        shifts = tl.arange(0, CPW) * BITS
        q = tl.reshape((word[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, offs_n.shape[0]))
    else:
        # 3/5/6-bit (CPW = 10, 6, 5: not a power of two, so no block shape fits one word's codes): every
        # row k loads its own word; the CPW rows of a word read the same addresses, served from L1.
        word = tl.load(codes_ptr + (offs_k // CPW)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        q = (word >> ((offs_k % CPW) * BITS)[:, None]) & ((1 << BITS) - 1)
    if GROUP == 0:
        # one group spans K: a [BLOCK_N] vector of scales
        qp_offs = offs_n[None, :]
        qp_mask = mask_n[None, :]
    elif GROUP % BLOCK_K == 0:
        # k0 is a multiple of BLOCK_K, so the whole tile lies in group k0 // GROUP: one vector load
        qp_offs = (k0 // GROUP) * N + offs_n[None, :]
        qp_mask = mask_n[None, :]
    elif BLOCK_K % GROUP == 0 and (GROUP & (GROUP - 1)) == 0:
        # several whole groups per tile: load their [BLOCK_K // GROUP, BLOCK_N] values once, then
        # broadcast each over its GROUP rows (same row-major reshape as the codes above)
        TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP
        offs_g = k0 // GROUP + tl.arange(0, TILE_GROUPS)
        qp_offs = offs_g[:, None] * N + offs_n[None, :]
        qp_mask = (offs_g < tl.cdiv(K, GROUP))[:, None] & mask_n[None, :]
    else:
        # other group sizes: a per-row group index
        qp_offs = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        qp_mask = mask
    scale = _expand_groups(tl.load(scale_ptr + qp_offs, mask=qp_mask, other=0.0).to(tl.float32), GROUP, BLOCK_K)
    if USE_LUT:
        w = tl.load(lut_ptr + q) * scale  # q < 2**BITS always (masked words are 0): no mask needed
    else:
        if HAS_ZERO:
            zero = _expand_groups(tl.load(zero_ptr + qp_offs, mask=qp_mask, other=0).to(tl.float32), GROUP, BLOCK_K)
        else:
            zero = ZERO_CONST
        w = (q.to(tl.float32) - zero) * scale
    return w


@triton.jit
def _expand_groups(values, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K // GROUP, BLOCK_N] per-group values → [BLOCK_K, BLOCK_N] when several whole power-of-two
    groups share a tile; any other shape (one row to broadcast, or already per row) is returned as is."""
    if GROUP != 0 and GROUP < BLOCK_K and BLOCK_K % GROUP == 0 and (GROUP & (GROUP - 1)) == 0:
        n: tl.constexpr = values.shape[1]
        values = tl.reshape(tl.broadcast_to(values[:, None, :], (BLOCK_K // GROUP, GROUP, n)), (BLOCK_K, n))
    return values


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in a GEMM grid of cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N).

    Ids run down GROUP_M row blocks before moving to the next column block, so programs running together
    share W column blocks (and x row blocks) while they are still in L2.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def round_half_even(v):
    """``torch.round`` semantics (ties to even) for float32 ``v``; |v| < 2**22 is exact."""
    f = tl.floor(v)
    d = v - f  # exact in float32 (floor(x + 0.5) would misround 0.49999997)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
