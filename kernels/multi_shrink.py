"""Multi-adapter shrink: ``S[pos] = s_a / (1 - p_a) * drop(x[perm[pos]]) @ A_a^T`` per row.

Adapters are packed along the rank: adapter a owns rows ``off[a] .. off[a] + rank[a]`` of
A ``[S, K]`` (and of B^T ``[S, N]``). Segment tiles (``multi_meta.segment_tile``) never
straddle adapters, and rank tiles past an adapter's real rank exit at once, so a rank-8
adapter in a bank of rank-64 ones costs rank 8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (configs, fp32_precision, m_bucket, on_device, rank_block, shrink_tile,
                     tune)
from .multi_meta import RowGroups, adapters_pow2, segment_tile, segment_tiles


def _configs(shapes):
    return configs(("BLOCK_M", "BLOCK_K"), shapes, dict(BLOCK_M=16, BLOCK_K=32))


# keyed by "A is fp32", as the single-adapter shrink
_CONFIGS = {False: _configs([(16, 256, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4)]),
            True: _configs([(16, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)])}


@triton.jit
def _multi_shrink_kernel(x_ptr, a_ptr, s_ptr, perm_ptr, seg_ptr, off_ptr, rank_ptr, scale_ptr,
                         p_ptr, M, K, R, n_adapters, M_BUCKET,
                         stride_xm, stride_xk, stride_am, stride_ak, stride_sm, stride_sr, seed_ptr,
                         DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, N_POW2: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x ``[M, K]`` (rows gathered through perm), packed A ``[S, K]`` (the dot runs in its
    dtype), S ``[M, R]`` fp32 in sorted order; off/rank int32, scale/p fp32 ``[n]``.

    Grid: (segment tiles, rank tiles of R = the largest rank).
    """
    adapter, row0, row_end = segment_tile(tl.program_id(0), seg_ptr, n_adapters, BLOCK_M, N_POW2)
    if adapter >= n_adapters:
        return
    rank = tl.load(rank_ptr + adapter)
    r0 = tl.program_id(1) * BLOCK_R
    if r0 >= rank:
        return
    pos = row0 + tl.arange(0, BLOCK_M)
    row_in = pos < row_end
    rows = tl.load(perm_ptr + pos, mask=row_in, other=0).to(tl.int64)
    ranks = r0 + tl.arange(0, BLOCK_R)
    rank_in = ranks < rank
    a_rows = tl.load(off_ptr + adapter).to(tl.int64) + ranks
    scale = tl.load(scale_ptr + adapter)
    p = 0.0
    if DROPOUT:
        p = tl.load(p_ptr + adapter)
        scale = scale / (1.0 - p)
    acc = shrink_tile(x_ptr, rows, row_in, stride_xm, stride_xk, a_ptr, a_rows, rank_in,
                      stride_am, stride_ak, K, seed_ptr, p, DROPOUT, PRECISION, BLOCK_K)
    tl.store(s_ptr + pos[:, None].to(tl.int64) * stride_sm + ranks[None, :] * stride_sr,
             acc * scale, mask=row_in[:, None] & rank_in[None, :])


KERNELS = {fp32: tune(_multi_shrink_kernel, c, ["M_BUCKET", "K", "R", "DROPOUT"])
           for fp32, c in _CONFIGS.items()}


@on_device
def multi_lora_shrink(x: torch.Tensor, A: torch.Tensor, offsets: torch.Tensor,
                      ranks: torch.Tensor, scales: torch.Tensor, max_rank: int, groups: RowGroups,
                      dropout: torch.Tensor | None = None,
                      seed: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[M, max_rank]`` in sorted order: row pos holds ``s_a / (1 - p_a) *
    drop(x[perm[pos]]) @ A_a^T`` in its first ``rank[a]`` columns (the rest, and base rows,
    are never written). x ``[M, K]``; A ``[S, K]``; offsets/ranks int32, scales (and
    dropout, probabilities) fp32 ``[n]``."""
    m, k = x.shape
    s = torch.empty((m, max(max_rank, 1)), dtype=torch.float32, device=x.device)
    if m == 0 or groups.n == 0:
        return s
    block_r = rank_block(max_rank)
    grid = lambda meta: (segment_tiles(m, groups.n, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(max_rank, block_r))
    KERNELS[A.dtype == torch.float32][grid](
        x, A, s, groups.perm, groups.seg, offsets, ranks, scales,
        dropout if dropout is not None else scales, m, k, max_rank, groups.n, m_bucket(m),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), s.stride(0), s.stride(1),
        seed if seed is not None else s,
        DROPOUT=dropout is not None, BLOCK_R=block_r, N_POW2=adapters_pow2(groups.n),
        PRECISION=fp32_precision())
    return s
