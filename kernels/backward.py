"""LoRA backward pieces that the fused linear kernel does not cover, for one adapter and
for multi-adapter batches (``MULTI``, over segment tiles of sorted rows: a tile never
straddles adapters, ranks stop at each adapter's real rank):

* ``_lora_dy_kernel``: one pass over dY gives ``dS = s dY' B`` ``[M, r]`` and
  ``dB = s dY'^T T`` (multi: each adapter's ``dB_a^T = dY'^T S`` into the packed ``[S, N]``
  gradient, S the scaled shrink), dY' = dY, or ``g dY`` with DoRA, which also sums
  ``dY * (Y - bias)`` over the rows (per adapter);
* ``_lora_da_kernel``: ``dA = dS^T drop(x)`` ``[r, K]`` (multi: adapter a's rows of the packed
  ``[S, K]`` gradient), the dropout mask regenerated.

Both reduce across programs with fp32 atomics into buffers a config pre-hook zeroes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (TL_DTYPES, Launch, configs, dora_g, dropout_keep, fp32_precision,
                     m_bucket, on_device, rank_block, sm_count, tune)
from .descriptors import Mat, Segments, dora_bank, mat, segments
from .multi_meta import PackedAdapters, RowMap, segment_tile, segment_tiles


@triton.jit
def _lora_dy_kernel(dy, b, t, ds, db, g, y, bias, dg, M, N, R, M_BUCKET, scale,
                    DORA: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, segs=None,
                    MULTI: tl.constexpr = False):
    """dY ``[M, N]``, B ``[N, R]`` (adapter dtype: the dots run in it), T ``[M, R]`` fp32
    (``Mat``s); dS ``[M, R]`` (contiguous) and dB ``[N, R]`` (``Mat``) are fp32 accumulators.

    DORA: the LoRA gradients are those of ``g * dY`` (g ``[N]`` fp32), and the same pass
    over dY accumulates ``dg * g = colsum(dY * (Y - bias))`` into dg ``[N]`` fp32 from the
    saved output Y ``[M, N]`` (``Mat``) and the bias ``[N]`` (or None). Without DORA, g, y,
    bias and dg are None.

    MULTI: B is the packed B^T ``[S, N]`` seen as ``[N, S]`` and dB its gradient (adapter
    a's columns ``segs.offsets[a] ..``), T the scaled shrink (dB gets no scale; dS each
    adapter's ``segs.scales``), rows through ``segs`` (``descriptors.Segments``; T, dS in
    batch row order); g is a ``DoraBank`` (its DoRA adapters take g from magnitude / weight
    norm and sum into their row of dg ``[n, N]``). Grid: (segment tiles, column splits,
    rank tiles). Otherwise grid: (row tiles, column splits, rank tiles). Split j visits
    column tiles j, j + splits, ...
    """
    splits = tl.num_programs(1)
    r0 = tl.program_id(2) * BLOCK_R
    ranks = r0 + tl.arange(0, BLOCK_R)
    if MULTI:
        adapter, rows, row_in, rank = segment_tile(tl.program_id(0), segs.seg, segs.perm,
                                                   segs.ranks, segs.n, BLOCK_M, segs.N_POW2)
        if r0 >= rank:
            return
        rank_in = ranks < rank
        b_rows = tl.load(segs.offsets + adapter).to(tl.int64) + ranks
        ds_scale = tl.load(segs.scales + adapter)
        db_scale = 1.0
        adapter = adapter.to(tl.int64)
        dora = False
        colsum = False
        if DORA:
            dora = tl.load(g.flags + adapter) != 0
            colsum = dora & (tl.program_id(2) == 0)
    else:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < M
        rank_in = ranks < R
        b_rows = ranks
        ds_scale = scale
        db_scale = scale
        adapter = 0
        dora = True
        colsum = tl.program_id(2) == 0
    t_tile = tl.load(t.ptr + rows[:, None] * t.stride0 + ranks[None, :] * t.stride1,
                     mask=row_in[:, None] & rank_in[None, :], other=0.0)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, N, splits * BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_in = cols < N
        dy_tile = tl.load(dy.ptr + rows[:, None] * dy.stride0 + cols[None, :] * dy.stride1,
                          mask=row_in[:, None] & col_in[None, :], other=0.0)
        b_tile = tl.load(b.ptr + cols[:, None] * b.stride0 + b_rows[None, :] * b.stride1,
                         mask=col_in[:, None] & rank_in[None, :], other=0.0)
        if DORA:
            if colsum:
                y_tile = tl.load(y.ptr + rows[:, None] * y.stride0 + cols[None, :] * y.stride1,
                                 mask=row_in[:, None] & col_in[None, :], other=0.0
                                 ).to(tl.float32)
                if bias is not None:
                    y_tile -= tl.load(bias + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
                tl.atomic_add(dg + adapter * N + cols,
                              tl.sum(dy_tile.to(tl.float32) * y_tile, axis=0), mask=col_in)
            dy_tile = dy_tile.to(tl.float32) * dora_g(g, adapter, dora, cols, col_in, MULTI)
        dy_tile = dy_tile.to(b_tile.dtype)
        ds_acc = tl.dot(dy_tile, b_tile, ds_acc, input_precision=PRECISION)
        db_tile = tl.dot(tl.trans(dy_tile), t_tile.to(b_tile.dtype), input_precision=PRECISION)
        tl.atomic_add(db.ptr + cols[:, None] * db.stride0 + b_rows[None, :] * db.stride1,
                      db_tile * db_scale, mask=col_in[:, None] & rank_in[None, :])
    tl.atomic_add(ds + rows[:, None] * R + ranks[None, :], ds_acc * ds_scale,
                  mask=row_in[:, None] & rank_in[None, :])


def _dy_configs(shapes, block_m=32):
    return configs(("BLOCK_M", "BLOCK_N"), shapes, dict(BLOCK_M=block_m, BLOCK_N=32),
                   zero=("ds", "db", "dg"))


# keyed by (multi-adapter rows, "B is fp32"): tf32x3 splits a [BLOCK_M, BLOCK_N] tile of
# dY, so narrow tiles
DY_KERNELS = {
    key: tune(_lora_dy_kernel, _dy_configs(shapes, 16 if key[0] else 32),
              ["M_BUCKET", "N", "R", "DORA"])
    for key, shapes in {
        (False, False): [(16, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3)],
        (False, True): [(32, 32, 4, 3), (64, 32, 4, 3)],
        (True, False): [(16, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        (True, True): [(32, 32, 4, 3), (64, 32, 4, 3)],
    }.items()}


@triton.jit
def _da_tile(acc, ds_ptr, x_ptr, rows, row_in, ranks, rank_in, cols, col_in, col0, K,
             stride_dsm, stride_dsr, stride_xm, stride_xk, seed, p, DOT_DTYPE: tl.constexpr,
             DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + dS[rows]^T drop(x[rows])`` for one tile of rows: ``[BLOCK_R, BLOCK_K]`` fp32."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=row_in[:, None] & col_in[None, :], other=0.0)
    if DROPOUT:
        x = tl.where(dropout_keep(seed, rows, col0, K, p, BLOCK_K), x, 0.0)
    ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
                 mask=row_in[:, None] & rank_in[None, :], other=0.0)
    return tl.dot(tl.trans(ds).to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def _lora_da_kernel(ds, x, da, M, K, R, M_BUCKET, seed, dropout_p, keep_scale,
                    DOT_DTYPE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    segs=None, p=None, MULTI: tl.constexpr = False):
    """dS ``[M, R]`` fp32 and x ``[M, K]`` (``Mat``s); dA ``[R, K]`` a contiguous fp32
    accumulator. DROPOUT: x's keep-mask from seed (int64 ``[1]``, else None) at dropout_p,
    times keep_scale (1 / (1 - dropout_p)).

    The dot runs in DOT_DTYPE, the adapter's dtype (PEFT casts x to it).
    MULTI: dA is the packed ``[S, K]`` gradient (adapter a's rows ``segs.offsets[a] ..``),
    rows through segs (``descriptors.Segments``), p ``[n]`` fp32 the adapters' dropout
    (DROPOUT); grid (column tiles, segment tiles, rank tiles). Otherwise grid (column tiles,
    row splits, rank tiles); split j visits row tiles j, j + splits...
    """
    col0 = tl.program_id(0) * BLOCK_K
    cols = col0.to(tl.int64) + tl.arange(0, BLOCK_K)
    r0 = tl.program_id(2) * BLOCK_R
    ranks = r0 + tl.arange(0, BLOCK_R)
    col_in = cols < K
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    seed_value = 0
    if DROPOUT:
        seed_value = tl.load(seed)
    if MULTI:
        adapter, rows, row_in, rank = segment_tile(tl.program_id(1), segs.seg, segs.perm,
                                                   segs.ranks, segs.n, BLOCK_M, segs.N_POW2)
        if r0 >= rank:
            return
        rank_in = ranks < rank
        adapter_p = 0.0
        if DROPOUT:
            adapter_p = tl.load(p + adapter)
        acc = _da_tile(acc, ds.ptr, x.ptr, rows, row_in, ranks, rank_in, cols, col_in, col0, K,
                       ds.stride0, ds.stride1, x.stride0, x.stride1, seed_value, adapter_p,
                       DOT_DTYPE, DROPOUT, PRECISION, BLOCK_K)
        keep_scale = 1.0 / (1.0 - adapter_p)
        a_rows = tl.load(segs.offsets + adapter).to(tl.int64) + ranks
    else:
        rank_in = ranks < R
        for m0 in range(tl.program_id(1) * BLOCK_M, M, tl.num_programs(1) * BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            acc = _da_tile(acc, ds.ptr, x.ptr, rows, rows < M, ranks, rank_in, cols, col_in,
                           col0, K, ds.stride0, ds.stride1, x.stride0, x.stride1, seed_value,
                           dropout_p, DOT_DTYPE, DROPOUT, PRECISION, BLOCK_K)
        a_rows = ranks
    if DROPOUT:
        acc *= keep_scale
    tl.atomic_add(da + a_rows[:, None] * K + cols[None, :], acc,
                  mask=rank_in[:, None] & col_in[None, :])


def _da_configs(shapes, block_m=32):
    return configs(("BLOCK_M", "BLOCK_K"), shapes, dict(BLOCK_M=block_m, BLOCK_K=32),
                   zero=("da",))


# keyed by (multi-adapter rows, "the dot runs in fp32"); the multi-adapter dot fits its
# tiles in fp32 too
_DA_MULTI = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)]
DA_KERNELS = {
    key: tune(_lora_da_kernel, _da_configs(shapes, 16 if key[0] else 32),
              ["M_BUCKET", "K", "R", "DROPOUT"], prune=key[0])
    for key, shapes in {
        (False, False): [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)],
        (False, True): [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3)],
        (True, False): _DA_MULTI, (True, True): _DA_MULTI,
    }.items()}


@dataclass
class DoraBackward:
    """What the DoRA backward reads besides dY: g ``[N]`` fp32, the output Y ``[M, N]``
    and the bias ``[N]`` (or None)."""
    g: torch.Tensor
    y: torch.Tensor
    bias: torch.Tensor | None


def _splits(tiles: int, other_tiles: int, sms: int) -> int:
    """How many programs share a reduction: enough for about two waves of a GPU of ``sms``
    multiprocessors (``sm_count``)."""
    return max(1, min(tiles, triton.cdiv(2 * sms, max(other_tiles, 1))))


# where a backward plan's per-call tensors sit in the descriptors (``Launch.slots``)
_DY_SLOTS = {"dy_ptr": ("dy", "ptr"), "b_ptr": ("b", "ptr"), "t_ptr": ("t", "ptr"),
             "ds_ptr": ("ds",), "db_ptr": ("db", "ptr")}
_DA_SLOTS = {"ds_ptr": ("ds", "ptr"), "x_ptr": ("x", "ptr"), "da_ptr": ("da",),
             "seed_ptr": ("seed",)}


def _dy_kernel(row_tiles, dy: torch.Tensor, b: Mat, t: torch.Tensor, ds: torch.Tensor, db: Mat,
               g, y: torch.Tensor | None, bias: torch.Tensor | None, dg: torch.Tensor | None,
               segs: Segments | None, scale: float) -> Launch:
    """The launch of ``_lora_dy_kernel`` (its config pre-hook zeroes ds, db and dg): dS
    ``[M, R]`` fp32 contiguous into ds; b and db ``[N, R]`` (``Mat``); with DoRA (y given)
    g (``[N]``, or a ``DoraBank`` with segs) and dg, else None; ``row_tiles(BLOCK_M)``: the
    grid's first axis."""
    m, n = dy.shape
    r = t.shape[1]
    block_r = rank_block(r)
    rank_tiles = triton.cdiv(r, block_r)
    sms = sm_count(dy.device)  # (the grid holds no tensor: a plan keeps it)

    def grid(meta):
        tiles = row_tiles(meta["BLOCK_M"])
        splits = _splits(triton.cdiv(n, meta["BLOCK_N"]), tiles * rank_tiles, sms)
        return (tiles, splits, rank_tiles)

    return Launch(DY_KERNELS[segs is not None, b.ptr.dtype == torch.float32], grid, dict(
        dy=mat(dy), b=b, t=mat(t), ds=ds, db=db, g=g, y=None if y is None else mat(y),
        bias=bias, dg=dg, M=m, N=n, R=r, M_BUCKET=m_bucket(m), scale=scale,
        DORA=y is not None, BLOCK_R=block_r, PRECISION=fp32_precision(), segs=segs,
        MULTI=segs is not None), _DY_SLOTS)


def _dy_launch(row_tiles, dy: torch.Tensor, b: Mat, t: torch.Tensor, db: Mat, g,
               y: torch.Tensor | None, bias: torch.Tensor | None, dg: torch.Tensor | None,
               segs: Segments | None, scale: float) -> torch.Tensor:
    """dS ``[M, R]`` fp32 from ``_dy_kernel``'s launch (the rest of the results accumulate
    into db and dg)."""
    ds = torch.empty((dy.shape[0], t.shape[1]), dtype=torch.float32, device=dy.device)
    _dy_kernel(row_tiles, dy, b, t, ds, db, g, y, bias, dg, segs, scale)()
    return ds


def dy_launch(dy: torch.Tensor, lora_B: torch.Tensor, t: torch.Tensor, ds: torch.Tensor,
              db: torch.Tensor, scaling: float, dora: DoraBackward | None = None,
              dg: torch.Tensor | None = None) -> Launch:
    """The launch of ``lora_dy`` (M > 0) accumulating ``s dY' B`` into ds fp32 ``[M, r]``
    (contiguous) and ``s dY'^T T`` into db fp32 ``[N, r]`` (and with DoRA the column sums
    into dg fp32 ``[N]``), each zeroed first by the launch; dy ``[M, N]``, lora_B ``[N, r]``,
    t ``[M, r]``. Its tensors (``Launch.slots``): dy_ptr, b_ptr, t_ptr, ds_ptr, db_ptr."""
    m = dy.shape[0]
    return _dy_kernel(lambda block_m: triton.cdiv(m, block_m), dy, mat(lora_B), t, ds, mat(db),
                      dora.g if dora else None, dora.y if dora else None,
                      dora.bias if dora else None, dg, None, scaling)


@on_device
def lora_dy(dy: torch.Tensor, lora_B: torch.Tensor, t: torch.Tensor, scaling: float,
            dora: DoraBackward | None = None) -> tuple[torch.Tensor, ...]:
    """``(dS, dB) = (s dY' B, s dY'^T T)`` as fp32, dY' = dY (or ``g * dY`` with DoRA, which
    also returns ``colsum(dY * (Y - bias))`` ``[N]``): dy ``[M, N]``, lora_B ``[N, r]``,
    t ``[M, r]``."""
    m, n = dy.shape
    r = lora_B.shape[1]
    db = torch.empty((n, r), dtype=torch.float32, device=dy.device)
    dg = torch.empty((n,), dtype=torch.float32, device=dy.device) if dora is not None else None
    ds = torch.empty((m, r), dtype=torch.float32, device=dy.device)
    if m == 0:
        return (ds, db.zero_()) + ((dg.zero_(),) if dora is not None else ())
    dy_launch(dy, lora_B, t, ds, db, scaling, dora, dg)()
    return (ds, db) + ((dg,) if dora is not None else ())


@on_device
def multi_lora_dy(dy: torch.Tensor, B: torch.Tensor, t: torch.Tensor, bank: PackedAdapters,
                  rows: RowMap, y: torch.Tensor | None = None, bias: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """``(dS, dB^T)`` as fp32 ``[M, R]`` (rows in batch order) and packed ``[S, N]``; with a
    DoRA bank and the forward's output y ``[M, N]`` (and bias), also ``colsum(dY * (Y -
    bias))`` per DoRA adapter ``[n, N]``. dy ``[M, N]``, B ``[S, N]`` packed B^T, t ``[M, R]``
    from ``multi_lora_shrink`` (summed over its chunks); sorted rows."""
    m, n = dy.shape
    dora = y is not None and bank.is_dora is not None
    db = torch.empty(B.shape, dtype=torch.float32, device=dy.device)
    dg = torch.empty((rows.n, n), dtype=torch.float32, device=dy.device) if dora else None
    if m == 0 or rows.n == 0:
        ds = torch.zeros((m, t.shape[1]), dtype=torch.float32, device=dy.device)
        return (ds, db.zero_()) + ((dg.zero_(),) if dora else ())
    # B^T and its gradient as [N, S]: the kernel reads b and db by (column, rank)
    ds = _dy_launch(lambda block_m: segment_tiles(m, rows.n, block_m), dy, mat(B.t()), t,
                    mat(db.t()), dora_bank(bank) if dora else None, y if dora else None,
                    bias if dora else None, dg, segments(rows, bank), 1.0)
    return (ds, db) + ((dg,) if dora else ())


def _da_kernel(da: torch.Tensor, ds: torch.Tensor, x: torch.Tensor, adapter_dtype: torch.dtype,
               second_axis, segs: Segments | None, **args) -> Launch:
    """The launch of ``_lora_da_kernel`` (its config pre-hook zeroes da);
    ``second_axis(BLOCK_M, column tiles, rank tiles)``: the grid's second axis; segs: the
    segment tiles of a multi-adapter batch, else None."""
    m, k = x.shape
    r = ds.shape[1]
    block_r = rank_block(r)
    rank_tiles = triton.cdiv(r, block_r)

    def grid(meta):
        col_tiles = triton.cdiv(k, meta["BLOCK_K"])
        return (col_tiles, second_axis(meta["BLOCK_M"], col_tiles * rank_tiles), rank_tiles)

    return Launch(DA_KERNELS[segs is not None, adapter_dtype == torch.float32], grid, dict(
        ds=mat(ds), x=mat(x), da=da, M=m, K=k, R=r, M_BUCKET=m_bucket(m),
        DOT_DTYPE=TL_DTYPES[adapter_dtype], BLOCK_R=block_r, PRECISION=fp32_precision(),
        segs=segs, MULTI=segs is not None, **args), _DA_SLOTS)


def _da_launch(da: torch.Tensor, ds: torch.Tensor, x: torch.Tensor, adapter_dtype: torch.dtype,
               second_axis, segs: Segments | None, **args) -> torch.Tensor:
    """da, into which ``_da_kernel``'s launch accumulated."""
    _da_kernel(da, ds, x, adapter_dtype, second_axis, segs, **args)()
    return da


def da_launch(ds: torch.Tensor, x: torch.Tensor, da: torch.Tensor, adapter_dtype: torch.dtype,
              dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> Launch:
    """The launch of ``lora_da`` (M > 0) accumulating ``dS^T drop(x)`` into da fp32 ``[r, K]``
    (contiguous), zeroed first by the launch: ds ``[M, r]`` fp32, x ``[M, K]``, seed int64
    ``[1]`` (dropout only). Its tensors (``Launch.slots``): ds_ptr, x_ptr, da_ptr, seed_ptr."""
    m, sms = x.shape[0], sm_count(x.device)
    splits = lambda block_m, others: _splits(triton.cdiv(m, block_m), others, sms)  # noqa: E731
    dropout = dropout_p > 0.0
    return _da_kernel(da, ds, x, adapter_dtype, splits, None, seed=seed if dropout else None,
                      dropout_p=dropout_p, keep_scale=1.0 / (1.0 - dropout_p), DROPOUT=dropout)


@on_device
def lora_da(ds: torch.Tensor, x: torch.Tensor, adapter_dtype: torch.dtype,
            dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """``dS^T drop(x)`` as fp32 ``[r, K]``: ds ``[M, r]`` fp32, x ``[M, K]``, seed int64 ``[1]``
    (dropout only)."""
    da = torch.empty((ds.shape[1], x.shape[1]), dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return da.zero_()
    da_launch(ds, x, da, adapter_dtype, dropout_p, seed)()
    return da


@on_device
def multi_lora_da(ds: torch.Tensor, x: torch.Tensor, bank: PackedAdapters, rows: RowMap,
                  packed_rows: int, adapter_dtype: torch.dtype,
                  seed: torch.Tensor | None = None) -> torch.Tensor:
    """Packed ``dA`` fp32 ``[packed_rows, K]``: ``dS_a^T drop(x_a)`` in adapter a's rows (the
    bank's dropout with ``seed``); ds ``[M, R]`` fp32 (rows in batch order), x ``[M, K]``,
    sorted rows."""
    m, k = x.shape
    da = torch.empty((packed_rows, k), dtype=torch.float32, device=x.device)
    if m == 0 or rows.n == 0:
        return da.zero_()
    tiles = lambda block_m, others: segment_tiles(m, rows.n, block_m)  # noqa: E731
    dropout = bank.dropout is not None
    return _da_launch(da, ds, x, adapter_dtype, tiles, segments(rows, bank),
                      seed=seed if dropout else None, dropout_p=0.0, keep_scale=1.0,
                      DROPOUT=dropout, p=bank.dropout)
