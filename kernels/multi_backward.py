"""Multi-adapter backward pieces that ``multi_fused_linear`` does not cover, over segment
tiles (a tile never straddles adapters, ranks stop at each adapter's real rank):

* ``_multi_dy_kernel``: one pass over dY gives ``dS = s_a dY' B_a`` ``[M, R]`` (sorted
  order), every adapter's ``dB_a^T = dY'^T S`` into the packed ``[S, N]`` gradient, and for
  DoRA adapters ``colsum(dY * (Y - bias))`` per adapter; ``dY' = g_a dY`` (g = 1 for LoRA);
* ``_multi_da_kernel``: ``dA_a = dS^T drop(x)`` into the packed ``[S, K]`` gradient.

Both reduce across programs with fp32 atomics into buffers a config pre-hook zeroes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backward import _TL_DTYPES, DoraBackward, _splits
from .common import (configs, dropout_keep, fp32_precision, m_bucket, on_device,
                     rank_block, tune)
from .multi_meta import RowGroups, adapters_pow2, segment_tile, segment_tiles


def _dy_configs(shapes):
    return configs(("BLOCK_M", "BLOCK_N"), shapes, dict(BLOCK_M=16, BLOCK_N=32),
                   zero=("ds_ptr", "db_ptr", "dg_ptr"))


# keyed by "B is fp32", as the single-adapter dy pass
_DY_CONFIGS = {False: _dy_configs([(16, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)]),
               True: _dy_configs([(32, 32, 4, 3), (64, 32, 4, 3)])}


@triton.jit
def _multi_dy_kernel(dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr, g_ptr, y_ptr, bias_ptr, dg_ptr,
                     perm_ptr, seg_ptr, off_ptr, rank_ptr, scale_ptr, dora_ptr,
                     M, N, R, n_adapters, M_BUCKET, stride_dym, stride_dyn, stride_bm, stride_bn,
                     stride_sm, stride_sr, stride_ym, stride_yn,
                     DORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                     N_POW2: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """dY ``[M, N]`` (rows gathered through perm), packed B^T ``[S, N]`` (the dots run in its
    dtype), S ``[M, R]`` fp32 (the forward's scaled shrink, sorted order); accumulators dS
    ``[M, R]``, dB^T ``[S, N]``, dg ``[n, N]``, contiguous fp32.

    DORA: g ``[n, N]`` fp32 scales dY's columns; adapters flagged in dora ``[n]`` (int8)
    also sum ``dY * (Y - bias)`` over their rows into dg, Y ``[M, N]`` the saved output.
    Grid: (segment tiles, column splits, rank tiles); split j visits column tiles j,
    j + splits, ...
    """
    adapter, row0, row_end = segment_tile(tl.program_id(0), seg_ptr, n_adapters, BLOCK_M, N_POW2)
    if adapter >= n_adapters:
        return
    rank = tl.load(rank_ptr + adapter)
    r0 = tl.program_id(2) * BLOCK_R
    if r0 >= rank:
        return
    splits = tl.num_programs(1)
    pos = row0 + tl.arange(0, BLOCK_M)
    row_in = pos < row_end
    rows = tl.load(perm_ptr + pos, mask=row_in, other=0).to(tl.int64)
    pos = pos.to(tl.int64)
    ranks = r0 + tl.arange(0, BLOCK_R)
    rank_in = ranks < rank
    b_rows = tl.load(off_ptr + adapter).to(tl.int64) + ranks
    t = tl.load(s_ptr + pos[:, None] * stride_sm + ranks[None, :] * stride_sr,
                mask=row_in[:, None] & rank_in[None, :], other=0.0)
    if DORA:
        colsum = (tl.load(dora_ptr + adapter) != 0) & (tl.program_id(2) == 0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, N, splits * BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_in = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_in[:, None] & col_in[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[None, :] * stride_bm + cols[:, None] * stride_bn,
                    mask=col_in[:, None] & rank_in[None, :], other=0.0)
        if DORA:
            if colsum:
                y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                            mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y -= tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
                tl.atomic_add(dg_ptr + adapter.to(tl.int64) * N + cols, tl.sum(dy.to(tl.float32) * y, axis=0),
                              mask=col_in)
            g = tl.load(g_ptr + adapter.to(tl.int64) * N + cols, mask=col_in, other=0.0)
            dy = dy.to(tl.float32) * g[None, :]
        dy = dy.to(b.dtype)
        ds = tl.dot(dy, b, ds, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), t.to(b.dtype), input_precision=PRECISION)
        tl.atomic_add(db_ptr + b_rows[None, :] * N + cols[:, None], db,
                      mask=col_in[:, None] & rank_in[None, :])
    scale = tl.load(scale_ptr + adapter)
    tl.atomic_add(ds_ptr + pos[:, None] * R + ranks[None, :], ds * scale,
                  mask=row_in[:, None] & rank_in[None, :])


DY_KERNELS = {fp32: tune(_multi_dy_kernel, c, ["M_BUCKET", "N", "R", "DORA"])
              for fp32, c in _DY_CONFIGS.items()}


# (the fp32 dot fits these tiles: no separate fp32 configs)
_DA_CONFIGS = configs(("BLOCK_M", "BLOCK_K"), [(64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)],
                      dict(BLOCK_M=16, BLOCK_K=32), zero=("da_ptr",))


@triton.jit
def _multi_da_kernel(ds_ptr, x_ptr, da_ptr, perm_ptr, seg_ptr, off_ptr, rank_ptr, p_ptr,
                     M, K, R, n_adapters, M_BUCKET, stride_dsm, stride_dsr, stride_xm, stride_xk,
                     seed_ptr, DOT_DTYPE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                     N_POW2: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """dS ``[M, R]`` fp32 (sorted order), x ``[M, K]`` (rows gathered through perm); dA
    ``[S, K]`` a contiguous fp32 accumulator, adapter a's rows ``off[a] ..``. The dot runs
    in DOT_DTYPE, the adapters' dtype. p ``[n]`` fp32: per-adapter dropout.

    Grid: (column tiles, segment tiles, rank tiles).
    """
    adapter, row0, row_end = segment_tile(tl.program_id(1), seg_ptr, n_adapters, BLOCK_M, N_POW2)
    if adapter >= n_adapters:
        return
    rank = tl.load(rank_ptr + adapter)
    r0 = tl.program_id(2) * BLOCK_R
    if r0 >= rank:
        return
    col0 = tl.program_id(0) * BLOCK_K
    cols = col0.to(tl.int64) + tl.arange(0, BLOCK_K)
    col_in = cols < K
    pos = row0 + tl.arange(0, BLOCK_M)
    row_in = pos < row_end
    rows = tl.load(perm_ptr + pos, mask=row_in, other=0).to(tl.int64)
    ranks = r0 + tl.arange(0, BLOCK_R)
    rank_in = ranks < rank
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=row_in[:, None] & col_in[None, :], other=0.0)
    if DROPOUT:
        p = tl.load(p_ptr + adapter)
        x = tl.where(dropout_keep(tl.load(seed_ptr), rows, col0, K, p, BLOCK_K), x, 0.0)
    ds = tl.load(ds_ptr + pos[:, None].to(tl.int64) * stride_dsm + ranks[None, :] * stride_dsr,
                 mask=row_in[:, None] & rank_in[None, :], other=0.0)
    acc = tl.dot(tl.trans(ds).to(DOT_DTYPE), x.to(DOT_DTYPE), input_precision=PRECISION)
    if DROPOUT:
        acc *= 1.0 / (1.0 - p)
    a_rows = tl.load(off_ptr + adapter).to(tl.int64) + ranks
    tl.atomic_add(da_ptr + a_rows[:, None] * K + cols[None, :], acc,
                  mask=rank_in[:, None] & col_in[None, :])


DA_KERNEL = tune(_multi_da_kernel, _DA_CONFIGS, ["M_BUCKET", "K", "R", "DROPOUT"])


@on_device
def multi_lora_dy(dy: torch.Tensor, B: torch.Tensor, s: torch.Tensor, offsets: torch.Tensor,
                  ranks: torch.Tensor, scales: torch.Tensor, groups: RowGroups,
                  dora: DoraBackward | None = None, dora_flags: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """``(dS, dB^T)`` as fp32 ``[M, R]`` (sorted order) and packed ``[S, N]``; with DoRA
    (g ``[n, N]``, flags ``[n]`` int8) also ``colsum(dY * (Y - bias))`` per adapter
    ``[n, N]``. dy ``[M, N]``, B ``[S, N]`` packed B^T, s ``[M, R]`` from
    ``multi_lora_shrink``."""
    m, n = dy.shape
    r = s.shape[1]
    ds = torch.empty((m, r), dtype=torch.float32, device=dy.device)
    db = torch.empty(B.shape, dtype=torch.float32, device=dy.device)
    dg = torch.empty((groups.n, n) if dora is not None else (1,), dtype=torch.float32,
                     device=dy.device)
    if m == 0 or groups.n == 0:
        return (ds.zero_(), db.zero_()) + ((dg.zero_(),) if dora is not None else ())
    block_r = rank_block(r)
    rank_tiles = triton.cdiv(r, block_r)

    def grid(meta):
        tiles = segment_tiles(m, groups.n, meta["BLOCK_M"])
        splits = _splits(triton.cdiv(n, meta["BLOCK_N"]), tiles * rank_tiles, dy.device)
        return (tiles, splits, rank_tiles)

    g, y, bias = (dora.g, dora.y, dora.bias) if dora is not None else (dg, dy, None)
    DY_KERNELS[B.dtype == torch.float32][grid](
        dy, B, s, ds, db, g, y, bias if bias is not None else dg, dg,
        groups.perm, groups.seg, offsets, ranks, scales,
        dora_flags if dora_flags is not None else ranks,
        m, n, r, groups.n, m_bucket(m), dy.stride(0), dy.stride(1), B.stride(0), B.stride(1),
        s.stride(0), s.stride(1), y.stride(0), y.stride(1),
        DORA=dora is not None, HAS_BIAS=bias is not None, BLOCK_R=block_r,
        N_POW2=adapters_pow2(groups.n), PRECISION=fp32_precision())
    return (ds, db) + ((dg,) if dora is not None else ())


@on_device
def multi_lora_da(ds: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                  rows: int, adapter_dtype: torch.dtype, groups: RowGroups,
                  dropout: torch.Tensor | None = None,
                  seed: torch.Tensor | None = None) -> torch.Tensor:
    """Packed ``dA`` fp32 ``[rows, K]``: ``dS_a^T drop(x_a)`` in adapter a's rows; ds
    ``[M, R]`` fp32 (sorted order), x ``[M, K]``."""
    m, k = x.shape
    r = ds.shape[1]
    da = torch.empty((rows, k), dtype=torch.float32, device=x.device)
    if m == 0 or groups.n == 0:
        return da.zero_()
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]),  # noqa: E731
                         segment_tiles(m, groups.n, meta["BLOCK_M"]), triton.cdiv(r, block_r))
    DA_KERNEL[grid](
        ds, x, da, groups.perm, groups.seg, offsets, ranks,
        dropout if dropout is not None else ds, m, k, r, groups.n, m_bucket(m),
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
        seed if seed is not None else da,
        DOT_DTYPE=_TL_DTYPES[adapter_dtype], DROPOUT=dropout is not None, BLOCK_R=block_r,
        N_POW2=adapters_pow2(groups.n), PRECISION=fp32_precision())
    return da
