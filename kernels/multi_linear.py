"""Multi-adapter fused linear: ``out[perm[pos]] = g_a * (a[perm[pos]] @ b + l[pos] @ lb_a) + bias``.

The base GEMM is tiled over *all* rows, in adapter-sorted order (x rows gathered, output
rows scattered through ``perm``), so each tile reads its slab of W once whatever adapters
its rows use. Before the K loop the tile adds the low-rank term of each adapter present,
over that adapter's real rank only, in one of two ways:

* a loop over the tile's segments (runs of rows with one adapter; a tile of sorted rows
  holds few), each a tensor-core dot masked to its rows. The per-row adapter metadata is
  loaded once as vectors, so the loop body issues no dependent scalar loads;
* ``GATHER`` (decode, M <= 16, tiny tiles): every row gathers its own adapter's rows of lb
  at once, ``sum_r l[m, r] * lb[off[a_m] + r, :]`` on CUDA cores, so a tile of 16 distinct
  adapters costs one round trip to memory per rank chunk instead of one per segment.

The same kernel computes the input gradient (``dx = (g dY) W + drop'(dS A_a)``): then g
scales the rows of dY (``SCALE_IN``) and the low-rank term carries the dropout keep-mask
of each row's adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (FP32_GEMM_SHAPES, dropout_keep, fp32_precision, gemm_configs, grouped_tile,
                     m_bucket, on_device, rank_block, tune)
from .multi_meta import RowGroups

_GATHER_MAX_M = 16
_GATHER_R = tl.constexpr(16)  # rank chunk of the gather path: [BLOCK_M, 16, BLOCK_N] products


# Tiles per path ("main"; "scale_in": DoRA's dx pass, which also streams an fp32
# [BLOCK_M, BLOCK_K] tile of g per step, so fewer stages; "gather": the forward at
# M <= 16, whose small column tiles keep the gathered [16, 16, BLOCK_N] in registers).
_SHAPES = {
    "main": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (32, 128, 128, 4, 4),
             (16, 64, 128, 4, 5),
             # decode: N / BLOCK_N programs must fill the GPU to stream W at full bandwidth
             (16, 16, 512, 4, 3)],
    "scale_in": [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 2), (16, 64, 128, 4, 4),
                 (16, 32, 256, 4, 3)],
    "gather": [(16, 16, 512, 4, 3), (16, 32, 256, 4, 3)],
}
# fp32 x and W (tf32x3 GEMM): short K steps on every path
_FP32_SHAPES = {"main": FP32_GEMM_SHAPES, "scale_in": FP32_GEMM_SHAPES,
                "gather": [s for s in FP32_GEMM_SHAPES if s[0] == _GATHER_MAX_M]}
_KEY = ["M_BUCKET", "N", "K", "R", "DROPOUT", "SCALE_OUT", "SCALE_IN"]


@triton.jit
def _multi_linear_kernel(a_ptr, b_ptr, l_ptr, lb_ptr, bias_ptr, g_ptr, p_ptr, out_ptr,
                         perm_ptr, key_ptr, off_ptr, rank_ptr, M, N, K, R, n_adapters, M_BUCKET,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr,
                         stride_lbr, stride_lbn, stride_gm, stride_gn, stride_om, stride_on, seed_ptr,
                         HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SCALE_OUT: tl.constexpr,
                         SCALE_IN: tl.constexpr, GATHER: tl.constexpr, BLOCK_R: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """a ``[M, K]`` and b ``[K, N]`` (same dtype), l ``[M, R]`` fp32 in sorted order, packed
    lb ``[S, N]`` (adapter a's rows ``off[a] ..``; the low-rank products run in its dtype),
    bias ``[N]``, out ``[M, N]``; g ``[n, *]`` fp32 (rows of plain adapters hold 1): on out's
    columns (SCALE_OUT) or a's (SCALE_IN). p ``[n]`` fp32: dropout of an ``[M, N]`` input.
    perm/key ``[M]`` (sorted position -> row, adapter; n for base rows), off/rank ``[n]``:
    int32.
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                  GROUP_M)
    first = tile_m * BLOCK_M
    pos = first + tl.arange(0, BLOCK_M)
    pos_in = pos < M
    rows = tl.load(perm_ptr + pos, mask=pos_in, other=0).to(tl.int64)
    keys = tl.load(key_ptr + pos, mask=pos_in, other=n_adapters)
    has_adapter = keys < n_adapters
    row_rank = tl.load(rank_ptr + keys, mask=has_adapter, other=0)
    row_off = tl.load(off_ptr + keys, mask=has_adapter, other=0).to(tl.int64)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < N
    l_rows = l_ptr + pos[:, None].to(tl.int64) * stride_lm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATHER:
        for r0 in range(0, tl.max(row_rank, axis=0), _GATHER_R):
            ranks = r0 + tl.arange(0, _GATHER_R)
            rank_in = ranks[None, :] < row_rank[:, None]
            lt = tl.load(l_rows + ranks[None, :] * stride_lr, mask=rank_in, other=0.0)
            lb_rows = (row_off[:, None] + ranks[None, :])[:, :, None] * stride_lbr
            lb = tl.load(lb_ptr + lb_rows + cols[None, None, :] * stride_lbn,
                         mask=rank_in[:, :, None] & col_in[None, None, :], other=0.0)
            lt = lt.to(lb.dtype).to(tl.float32)
            acc += tl.sum(lt[:, :, None] * lb.to(tl.float32), axis=1)
    else:
        # sorted rows: the tile's adapters come in runs, base rows (key n) last
        last = tl.min(tl.where(has_adapter, first + BLOCK_M, pos), axis=0)
        start = first
        while start < last:  # one segment (adapter) of the tile per iteration
            here = pos == start
            adapter = tl.sum(tl.where(here, keys, 0), axis=0)
            rank = tl.sum(tl.where(here, row_rank, 0), axis=0)
            lb_row0 = tl.sum(tl.where(here, row_off, 0), axis=0)
            in_seg = keys == adapter
            for r0 in range(0, rank, BLOCK_R):
                ranks = r0 + tl.arange(0, BLOCK_R)
                rank_in = ranks < rank
                lt = tl.load(l_rows + ranks[None, :] * stride_lr,
                             mask=in_seg[:, None] & rank_in[None, :], other=0.0)
                lb = tl.load(lb_ptr + (lb_row0 + ranks)[:, None] * stride_lbr
                             + cols[None, :] * stride_lbn,
                             mask=rank_in[:, None] & col_in[None, :], other=0.0)
                acc = tl.dot(lt.to(lb.dtype), lb, acc, input_precision=PRECISION)
            start = tl.min(tl.where(keys > adapter, pos, first + BLOCK_M), axis=0)
    if DROPOUT:
        p = tl.load(p_ptr + keys, mask=has_adapter, other=0.0)[:, None]
        keep = dropout_keep(tl.load(seed_ptr), rows, tile_n * BLOCK_N, N, p, BLOCK_N)
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    g_rows = g_ptr + keys[:, None].to(tl.int64) * stride_gm
    if SCALE_IN:
        g_ptrs = g_rows + ks[None, :] * stride_gn
    for k0 in range(0, K, BLOCK_K):
        k_in = ks < K - k0
        a = tl.load(a_ptrs, mask=pos_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
        if SCALE_IN:
            g_in = tl.load(g_ptrs, mask=has_adapter[:, None] & k_in[None, :], other=1.0)
            a = (a.to(tl.float32) * g_in).to(b.dtype)
            g_ptrs += BLOCK_K * stride_gn
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SCALE_OUT:  # DoRA: each row times its adapter's column factor
        acc *= tl.load(g_rows + cols[None, :] * stride_gn,
                       mask=has_adapter[:, None] & col_in[None, :], other=1.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=pos_in[:, None] & col_in[None, :])


# keyed by (path, fp32 x and W)
KERNELS = {(path, fp32): tune(_multi_linear_kernel, gemm_configs(shapes[path]), _KEY)
           for fp32, shapes in ((False, _SHAPES), (True, _FP32_SHAPES)) for path in shapes}


@dataclass
class MultiLowRank:
    """The prologue term of ``multi_fused_linear``: l ``[M, R]`` fp32 in sorted order (R the
    largest rank), packed lb ``[S, N]``, offsets/ranks int32 ``[n]``, the row groups, and
    optionally per-adapter dropout probabilities ``[n]`` fp32 with the seed of an ``[M, N]``
    input's keep-mask."""
    l: torch.Tensor
    lb: torch.Tensor
    offsets: torch.Tensor
    ranks: torch.Tensor
    groups: RowGroups
    dropout: torch.Tensor | None = None
    seed: torch.Tensor | None = None


@on_device
def multi_fused_linear(a: torch.Tensor, b: torch.Tensor, low: MultiLowRank,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                       g_out: torch.Tensor | None = None, g_in: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """``g * (a @ b + low-rank term) + bias`` with per-row adapters: a ``[M, K]``, b ``[K, N]``
    (any strides); g_out ``[n, N]`` or g_in ``[n, K]`` fp32 (1 in rows of plain adapters)."""
    if g_out is not None and g_in is not None:
        raise ValueError("multi_fused_linear takes g_out or g_in, not both")
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=out_dtype or a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    r = low.l.shape[1]
    g = g_out if g_out is not None else g_in
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    gather = m <= _GATHER_MAX_M and g_in is None
    path = "scale_in" if g_in is not None else "gather" if gather else "main"
    KERNELS[path, a.dtype == torch.float32][grid](
        a, b, low.l, low.lb, bias if bias is not None else out, g if g is not None else low.l,
        low.dropout if low.dropout is not None else low.l, out,
        low.groups.perm, low.groups.keys, low.offsets, low.ranks,
        m, n, k, r, low.groups.n, m_bucket(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), low.l.stride(0), low.l.stride(1),
        low.lb.stride(0), low.lb.stride(1), g.stride(0) if g is not None else 0,
        g.stride(1) if g is not None else 0, out.stride(0), out.stride(1),
        low.seed if low.seed is not None else out,
        HAS_BIAS=bias is not None, DROPOUT=low.dropout is not None,
        SCALE_OUT=g_out is not None, SCALE_IN=g_in is not None, GATHER=gather,
        BLOCK_R=rank_block(r),
        PRECISION=fp32_precision())
    return out
