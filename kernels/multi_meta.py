"""Launch metadata of multi-adapter batches: which adapter each row uses (``RowMap``), the
bank's per-adapter facts (``AdapterMeta``), and the jit helpers that read them.

Every row of x carries an adapter index (-1: base only). The kernels read it in one of two
ways (``RowMap``):

* gathered (``index``, rows in batch order; decode, ``M <= GATHER_MAX_M``): every row
  loads its own adapter's rows of A (shrink) and of B (the GEMM prologue). Nothing is
  sorted, so a layer costs two launches, whatever the adapters;
* sorted (``groups``, from ``group_rows``): rows sorted stably by adapter (base rows last),
  for sorted position ``pos`` the original row ``perm[pos]`` and its adapter ``keys[pos]``,
  per adapter the range ``seg[a] .. seg[a + 1]`` of positions (``seg[n] .. seg[n + 1] = M``:
  the base rows). Kernels use tiles of sorted rows (the GEMM, which loops over the few
  adapters present in a tile) or *segment tiles*, which never straddle adapters
  (``segment_tile``): tensor-core dots per adapter.

Where the two meet (``GATHER_MAX_M``): the gathered low-rank term runs on CUDA cores and
reads ``M x r`` rows of B per column tile, the sorted one ``adapters present x r`` rows on
tensor cores but after a sort (a few small launches per batch) and a dependent loop over
the tile's segments. Decode batches (up to 128 rows: the serving buckets of
bench/bench_serve.py) rarely share adapters between many rows, so each row's own B rows
are about what the sorted path reads too, without its segment loop; prefill rows (hundreds
per sequence) share adapters, and tensor cores win. 128 is the issue's bound for decode
batches, not a measurement: tune it on a GPU (bench/bench_multi.py, M in 64..256).

Sizes depend on M and the number of adapters only, so the launches are CUDA-graph safe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


GATHER_MAX_M = 128  # batches of at most this many rows take the gathered (decode) path


def gathers(m: int) -> bool:
    """Whether a batch of ``m`` rows takes the gathered (decode) path."""
    return m <= GATHER_MAX_M


@dataclass
class RowGroups:
    """``perm`` ``[M]``, ``keys`` ``[M]`` and ``seg`` ``[n + 2]`` for n adapters (indices
    ``0 .. n - 1``), all int32 on x's device."""
    perm: torch.Tensor
    keys: torch.Tensor
    seg: torch.Tensor


def group_rows(index: torch.Tensor, n: int) -> RowGroups:
    """Group the rows of a batch by adapter: index ``[M]`` integer, -1 for base rows.

    Indices outside ``-1 .. n - 1`` are clamped here (so no kernel reads out of bounds);
    they are refused before (``fastlora.ops.checks.check_index``, when a routing is made).
    """
    key = index.reshape(-1).to(torch.int32)
    key = torch.where(key < 0, n, key).clamp_(0, n)
    perm = torch.argsort(key, stable=True).to(torch.int32)
    keys = key[perm]
    seg = torch.searchsorted(keys, torch.arange(n + 2, dtype=torch.int32, device=key.device),
                             out_int32=True)
    return RowGroups(perm, keys, seg)


@dataclass(frozen=True)
class RowMap:
    """Which adapter each row of a batch uses, as the kernels read it: ``index`` ``[M]``
    int32 (the slot per row, -1 base only: the gathered path), else ``groups`` (the sorted
    path); a gathered map may carry the same rows' groups too, for the backward (which
    works on sorted rows). ``n`` adapter slots. Indices outside ``-1 .. n - 1`` read as
    base rows."""
    n: int
    index: torch.Tensor | None = None
    groups: RowGroups | None = None

    @property
    def gather(self) -> bool:
        return self.index is not None

    def grouped(self) -> RowMap:
        """The sorted form (its groups, made from the index only when it carries none)."""
        if not self.gather:
            return self
        return RowMap(self.n, groups=self.groups or group_rows(self.index, self.n))


@dataclass(frozen=True)
class AdapterMeta:
    """The per-adapter facts of a packed bank the kernels load, all on the device: adapter a
    owns rows ``offsets[a] .. offsets[a] + ranks[a]`` of the packed A / B^T (int32 ``[n]``),
    scales fp32 ``[n]``; ``max_rank`` (host) sizes the ``[M, max_rank]`` buffers. dropout:
    fp32 ``[n]`` probabilities, or None (no dropout). DoRA: magnitude ``[n, N]`` (any float,
    unit column stride), weight_norm fp32 ``[n, N]`` (unit column stride) and flags
    ``[n]`` int8 (nonzero: a DoRA adapter, ``g = magnitude / weight_norm``; else g = 1), or
    None."""
    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    max_rank: int
    dropout: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    weight_norm: torch.Tensor | None = None
    flags: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.offsets.shape[0]

    @property
    def dora(self) -> bool:
        return self.flags is not None


def segment_tiles(m: int, n: int, block_m: int) -> int:
    """Programs that cover every segment tile: each adapter adds at most one partial tile,
    and no tile is empty, so ``min(cdiv(M, BLOCK_M) + n, M)`` (static: M and n only)."""
    return max(min(triton.cdiv(m, block_m) + n, m), 1)


@triton.jit
def segment_tile(pid, seg_ptr, perm_ptr, rank_ptr, n_adapters, BLOCK_M: tl.constexpr,
                 N_POW2: tl.constexpr):
    """Segment tile ``pid``: adapter a's sorted rows ``seg[a] .. seg[a + 1]`` cut into tiles
    of BLOCK_M rows, adapters in order. Returns (adapter, rows int64 through perm, row_in,
    the adapter's rank); rank 0 when ``pid`` is past the last tile (the program has no
    work)."""
    ids = tl.arange(0, N_POW2)
    valid = ids < n_adapters
    start = tl.load(seg_ptr + ids, mask=valid, other=0)
    end = tl.load(seg_ptr + ids + 1, mask=valid, other=0)
    tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, axis=0)
    adapter = tl.sum((cum <= pid).to(tl.int32), axis=0)
    mine = ids == adapter
    first_tile = tl.sum(tl.where(mine, cum - tiles, 0), axis=0)
    pos = (tl.sum(tl.where(mine, start, 0), axis=0) + (pid - first_tile) * BLOCK_M
           + tl.arange(0, BLOCK_M))
    row_in = pos < tl.sum(tl.where(mine, end, 0), axis=0)
    rows = tl.load(perm_ptr + pos, mask=row_in, other=0).to(tl.int64)
    rank = tl.load(rank_ptr + adapter, mask=adapter < n_adapters, other=0)
    return adapter, rows, row_in, rank


@triton.jit
def tile_rows(first, M, index_ptr, perm_ptr, key_ptr, n_adapters, BLOCK_M: tl.constexpr,
              GATHER: tl.constexpr):
    """Rows ``first .. first + BLOCK_M`` of a multi-adapter tile: (rows int64, row_in, keys,
    has_adapter). GATHER: rows in batch order, ``keys = index[rows]``; else sorted
    positions, rows through perm and keys from the sorted keys."""
    pos = first + tl.arange(0, BLOCK_M)
    row_in = pos < M
    if GATHER:
        rows = pos.to(tl.int64)
        keys = tl.load(index_ptr + rows, mask=row_in, other=-1)
    else:
        rows = tl.load(perm_ptr + pos, mask=row_in, other=0).to(tl.int64)
        keys = tl.load(key_ptr + pos, mask=row_in, other=n_adapters)
    return rows, row_in, keys, (keys >= 0) & (keys < n_adapters)
