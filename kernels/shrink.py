"""Shrink: ``T = drop(x) @ A^T`` (fp32 ``[M, r]``), dropout drawn in-kernel, mask never stored.

One kernel for one adapter and for multi-adapter batches (``MULTI``): adapters packed
along the rank, adapter a owning rows ``off[a] .. off[a] + rank[a]`` of A ``[S, K]``, each
row scaled by its adapter's ``s_a / (1 - p_a)``, T in the batch's row order. Sorted rows
(``multi_meta.RowMap``) run over segment tiles, which never straddle adapters (tensor-core
dots; rank tiles past an adapter's real rank exit at once, so a rank-8 adapter in a bank
of rank-64 ones costs rank 8). Gathered rows (``GATHER``, decode) are not sorted: every row
multiplies its own adapter's rows of A on CUDA cores, and K is cut into chunks whose
partial sums the fused linear's prologue adds (``gather_splits``), so a batch of a few
rows still spreads over the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (Launch, configs, dropout_keep, fp32_precision, interpreting, m_bucket,
                     on_device, rank_block, shrink_tile, tune)
from .descriptors import Mat, mat, rows_view, segments
from .multi_meta import PackedAdapters, RowMap, segment_tile, segment_tiles, tile_rows

_GATHER_R = 16  # rank tile of the gathered shrink: [BLOCK_M, 16, BLOCK_K] products


@triton.jit
def _gathered_shrink(x_ptr, a_ptr, rows, row_in, row_off, ranks, rank_in, stride_xm, stride_xk,
                     stride_ar, stride_ak, k_begin, k_end, K, seed_ptr, p,
                     DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr):
    """``keep(x[rows]) @ A[row_off + ranks]^T`` per row over columns ``k_begin .. k_end``
    (k_begin a multiple of 4), fp32 ``[BLOCK_M, len(ranks)]``: each row its own rows of A
    (``rank_in`` ``[BLOCK_M, R]``), products in A's dtype, sums in fp32. p ``[BLOCK_M, 1]``:
    the rows' dropout."""
    acc = tl.zeros((rows.shape[0], ranks.shape[0]), dtype=tl.float32)
    a_rows = (row_off[:, None] + ranks[None, :])[:, :, None] * stride_ar
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_in = cols < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_in[:, None] & col_in[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(dropout_keep(seed, rows, k0, K, p, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + a_rows + cols[None, None, :] * stride_ak,
                    mask=rank_in[:, :, None] & col_in[None, None, :], other=0.0)
        x = x.to(a.dtype).to(tl.float32)
        acc += tl.sum(x[:, None, :] * a.to(tl.float32), axis=2)
    return acc


@triton.jit
def _lora_shrink_kernel(x, a, t, M_BUCKET, M, K, R, seed, dropout_p, keep_scale,
                        DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, stride_ts=0, k_chunk=0,
                        segs=None, gathered=None, p=None, MULTI: tl.constexpr = False,
                        GATHER: tl.constexpr = False):
    """x ``[M, K]`` (``Mat``, any float), A ``[R, K]`` (``Mat``, adapter dtype: the dot runs
    in it, as PEFT casts x to it), T ``[M, R]`` fp32 (``Mat``), times keep_scale (1 / (1 -
    dropout_p)) with DROPOUT (seed int64 ``[1]``, else None).

    MULTI: packed A ``[S, K]``; the bank's offsets, ranks and scales in segs
    (``descriptors.Segments``), p fp32 ``[n]`` its dropout (DROPOUT); rows of adapter a get
    ``s_a / (1 - p_a) * drop(x) @ A_a^T`` in their first ``rank[a]`` columns of T ``[M, R]``
    (R the largest rank; other columns and base rows are never written). Sorted rows
    (segs.perm, segs.seg): grid (segment tiles, rank tiles). GATHER (``gathered``: a
    ``descriptors.Rows`` of rows in batch order; segs.perm, segs.seg None): grid (row
    tiles, rank tiles of 16, K chunks of ``k_chunk`` columns), chunk c's partial sum in
    ``T[c]`` of T ``[chunks, M, R]`` (t its ``[M, R]`` slice 0, stride_ts the step to the
    next). Otherwise grid (row tiles, rank tiles).
    """
    r0 = tl.program_id(1) * BLOCK_R
    ranks = r0 + tl.arange(0, BLOCK_R)
    t_ptr = t.ptr
    if MULTI:
        if GATHER:
            rows, row_in, keys, has_adapter = tile_rows(
                tl.program_id(0) * BLOCK_M, M, gathered.index, gathered.perm, gathered.keys,
                gathered.n, BLOCK_M, gathered.GATHER)
            row_rank = tl.load(segs.ranks + keys, mask=has_adapter, other=0)
            if r0 >= tl.max(row_rank, axis=0):
                return
            row_off = tl.load(segs.offsets + keys, mask=has_adapter, other=0).to(tl.int64)
            scale = tl.load(segs.scales + keys, mask=has_adapter, other=0.0)[:, None]
            row_p = tl.zeros_like(scale)
            if DROPOUT:
                row_p = tl.load(p + keys, mask=has_adapter, other=0.0)[:, None]
                scale = scale / (1.0 - row_p)
            out_in = ranks[None, :] < row_rank[:, None]
            k_begin = tl.program_id(2) * k_chunk
            acc = _gathered_shrink(x.ptr, a.ptr, rows, row_in, row_off, ranks, out_in,
                                   x.stride0, x.stride1, a.stride0, a.stride1, k_begin,
                                   tl.minimum(k_begin + k_chunk, K), K, seed, row_p, DROPOUT,
                                   BLOCK_K)
            t_ptr += tl.program_id(2).to(tl.int64) * stride_ts
        else:
            adapter, rows, row_in, rank = segment_tile(tl.program_id(0), segs.seg, segs.perm,
                                                       segs.ranks, segs.n, BLOCK_M, segs.N_POW2)
            if r0 >= rank:
                return
            rank_in = ranks < rank
            scale = tl.load(segs.scales + adapter)
            adapter_p = 0.0
            if DROPOUT:
                adapter_p = tl.load(p + adapter)
                scale = scale / (1.0 - adapter_p)
            a_rows = tl.load(segs.offsets + adapter).to(tl.int64) + ranks
            acc = shrink_tile(x.ptr, rows, row_in, x.stride0, x.stride1, a.ptr, a_rows, rank_in,
                              a.stride0, a.stride1, K, seed, adapter_p, DROPOUT, PRECISION,
                              BLOCK_K)
            out_in = row_in[:, None] & rank_in[None, :]
    else:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < M
        rank_in = ranks < R
        acc = shrink_tile(x.ptr, rows, row_in, x.stride0, x.stride1, a.ptr, ranks.to(tl.int64),
                          rank_in, a.stride0, a.stride1, K, seed, dropout_p, DROPOUT,
                          PRECISION, BLOCK_K)
        scale = 1.0
        if DROPOUT:
            scale = keep_scale
        out_in = row_in[:, None] & rank_in[None, :]
    tl.store(t_ptr + rows[:, None] * t.stride0 + ranks[None, :] * t.stride1, acc * scale,
             mask=out_in)


_KEY = ["M_BUCKET", "K", "R", "DROPOUT"]


def _configs(shapes, interp):
    return configs(("BLOCK_M", "BLOCK_K"), shapes, interp)


# keyed by (rows, "A is fp32"): one adapter ("single"), sorted multi-adapter rows
# ("sorted"), gathered rows ("gather": [BLOCK_M, 16, BLOCK_K] products on CUDA cores, no
# dot, so one set for both dtypes). The tf32x3 splits of x and A need smaller tiles
# (check-kernels).
_SHAPES = {("single", False): [(16, 256, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3)],
           ("single", True): [(16, 64, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
           ("sorted", False): [(16, 256, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4)],
           ("sorted", True): [(16, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]}
KERNELS = {key: tune(_lora_shrink_kernel, _configs(
    shapes, dict(BLOCK_M=32 if key[0] == "single" else 16, BLOCK_K=32)), _KEY)
    for key, shapes in _SHAPES.items()}
_GATHER_KERNEL = tune(_lora_shrink_kernel, _configs(
    [(4, 64, 4, 2), (8, 32, 4, 2), (8, 64, 8, 2), (16, 32, 8, 2)], dict(BLOCK_M=16, BLOCK_K=32)),
    _KEY)
KERNELS["gather", False] = KERNELS["gather", True] = _GATHER_KERNEL


def gather_splits(k: int) -> tuple[int, int]:
    """``(chunks, chunk)``: the gathered shrink cuts K into ``chunks`` runs of ``chunk``
    columns (a multiple of 64, at least 512, so that at most 8 partial sums reach the
    GEMM's prologue; 64 in the interpreter, so that the tests cross chunk edges)."""
    least = 64 if interpreting() else 512
    chunk = max(least, triton.cdiv(triton.cdiv(k, 8), 64) * 64)
    return max(triton.cdiv(k, chunk), 1), chunk


# where a launch plan's per-call tensors sit in the descriptors (``Launch.slots``)
_SLOTS = {"x_ptr": ("x", "ptr"), "a_ptr": ("a", "ptr"), "t_ptr": ("t", "ptr"),
          "seed_ptr": ("seed",), "index_ptr": ("gathered", "index")}


def _launch(kernel, grid, x: torch.Tensor, a: torch.Tensor, t: Mat, **args) -> Launch:
    m, k = x.shape
    return Launch(kernel, grid, dict(x=mat(x), a=mat(a), t=t, M=m, K=k, R=t.ptr.shape[-1],
                                     M_BUCKET=m_bucket(m), PRECISION=fp32_precision(), **args),
                  _SLOTS)


def shrink_launch(x: torch.Tensor, lora_A: torch.Tensor, t: torch.Tensor,
                  dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> Launch:
    """The launch that writes ``drop(x) @ lora_A.T`` into t fp32 ``[M, r]`` (M > 0); x
    ``[M, K]``, lora_A ``[r, K]``, seed int64 ``[1]`` on x's device when ``dropout_p > 0``.
    Its tensors (``Launch.slots``): x_ptr, a_ptr, t_ptr, seed_ptr."""
    m, r = t.shape
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))  # noqa: E731
    return _launch(KERNELS["single", lora_A.dtype == torch.float32], grid, x, lora_A, mat(t),
                   seed=seed if dropout_p > 0.0 else None, dropout_p=dropout_p,
                   keep_scale=1.0 / (1.0 - dropout_p), DROPOUT=dropout_p > 0.0, BLOCK_R=block_r)


@on_device
def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float = 0.0,
                seed: torch.Tensor | None = None) -> torch.Tensor:
    """``drop(x) @ lora_A.T`` as fp32 ``[M, r]``; x ``[M, K]``, lora_A ``[r, K]``; seed int64
    ``[1]`` on x's device when ``dropout_p > 0``."""
    t = torch.empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32, device=x.device)
    if x.shape[0]:
        shrink_launch(x, lora_A, t, dropout_p, seed)()
    return t


def multi_shrink_launch(x: torch.Tensor, A: torch.Tensor, t: torch.Tensor, bank: PackedAdapters,
                        rows: RowMap, seed: torch.Tensor | None = None) -> Launch:
    """The launch of ``multi_lora_shrink`` into t ``[chunks, M, max_rank]`` (M > 0, n > 0).
    Its per-batch tensors (``Launch.slots``): x_ptr, t_ptr, seed_ptr, index_ptr (gathered
    rows)."""
    m, k = x.shape
    r = t.shape[2]
    chunk = gather_splits(k)[1] if rows.gather else k
    if rows.gather:
        block_r = _GATHER_R
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r), t.shape[0])  # noqa: E731
    else:
        block_r = rank_block(r)
        grid = lambda meta: (segment_tiles(m, rows.n, meta["BLOCK_M"]), triton.cdiv(r, block_r))  # noqa: E731
    kernel = KERNELS["gather" if rows.gather else "sorted", A.dtype == torch.float32]
    dropout = bank.dropout is not None
    return _launch(kernel, grid, x, A, Mat(t, t.stride(1), t.stride(2)),
                   seed=seed if dropout else None, dropout_p=0.0, keep_scale=1.0,
                   DROPOUT=dropout, BLOCK_R=block_r, stride_ts=t.stride(0), k_chunk=chunk,
                   segs=segments(rows, bank), gathered=rows_view(rows) if rows.gather else None,
                   p=bank.dropout, MULTI=True, GATHER=rows.gather)


@on_device
def multi_lora_shrink(x: torch.Tensor, A: torch.Tensor, bank: PackedAdapters, rows: RowMap,
                      seed: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[chunks, M, max_rank]``: summed over chunks, row i holds ``s_a / (1 - p_a) *
    drop(x_i) @ A_a^T`` in its first ``rank[a]`` columns for its adapter a (the rest, and
    base rows, are never written). One chunk for sorted rows, ``gather_splits(K)`` for
    gathered ones. x ``[M, K]``; A ``[S, K]``; dropout (``bank.dropout``) needs ``seed``."""
    m, k = x.shape
    chunks = gather_splits(k)[0] if rows.gather else 1
    t = torch.empty((chunks, m, max(bank.max_rank, 1)), dtype=torch.float32, device=x.device)
    if m and rows.n:
        multi_shrink_launch(x, A, t, bank, rows, seed)()
    return t
