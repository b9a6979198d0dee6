"""Row grouping for multi-adapter batches: rows sorted by adapter, on the device, no host sync.

Every row of x carries an adapter index (-1: base only). ``group_rows`` sorts the rows
stably by adapter (base rows last) and gives, for sorted position ``pos``, the original row
``perm[pos]`` and its adapter ``keys[pos]``, and per adapter the range of sorted positions
``seg[a] .. seg[a + 1]`` (``seg[n] .. seg[n + 1] = M``: the base rows). The kernels then use
either tiles of sorted rows (the GEMM, which loops over the few adapters present in a tile)
or *segment tiles*, which never straddle adapters (``segment_tile``). Sizes depend on M and
the number of adapters only, so the launches are CUDA-graph safe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import next_pow2


@dataclass
class RowGroups:
    """``perm`` ``[M]``, ``keys`` ``[M]`` and ``seg`` ``[n + 2]``, all int32 on x's device;
    ``n`` adapters (indices ``0 .. n - 1``)."""
    perm: torch.Tensor
    keys: torch.Tensor
    seg: torch.Tensor
    n: int


def group_rows(index: torch.Tensor, n: int) -> RowGroups:
    """Group the rows of a batch by adapter: index ``[M]`` integer, -1 for base rows.

    Indices outside ``-1 .. n - 1`` are clamped here (so no kernel reads out of bounds);
    the caller checks them (``fastlora.multi``).
    """
    key = index.reshape(-1).to(torch.int32)
    key = torch.where(key < 0, n, key).clamp_(0, n)
    perm = torch.argsort(key, stable=True).to(torch.int32)
    keys = key[perm]
    seg = torch.searchsorted(keys, torch.arange(n + 2, dtype=torch.int32, device=key.device),
                             out_int32=True)
    return RowGroups(perm, keys, seg, n)


def segment_tiles(m: int, n: int, block_m: int) -> int:
    """Programs that cover every segment tile: each adapter adds at most one partial tile,
    and no tile is empty, so ``min(cdiv(M, BLOCK_M) + n, M)`` (static: M and n only)."""
    return max(min(triton.cdiv(m, block_m) + n, m), 1)


def adapters_pow2(n: int) -> int:
    """``N_POW2`` for ``segment_tile``: n rounded up to a power of two."""
    return max(next_pow2(n), 2)


@triton.jit
def segment_tile(pid, seg_ptr, n_adapters, BLOCK_M: tl.constexpr, N_POW2: tl.constexpr):
    """Segment tile ``pid``: adapter a's sorted rows ``seg[a] .. seg[a + 1]`` cut into tiles
    of BLOCK_M rows, adapters in order. Returns (adapter, first position, end position);
    adapter >= n_adapters when ``pid`` is past the last tile (the program has no work)."""
    ids = tl.arange(0, N_POW2)
    valid = ids < n_adapters
    start = tl.load(seg_ptr + ids, mask=valid, other=0)
    end = tl.load(seg_ptr + ids + 1, mask=valid, other=0)
    tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, axis=0)
    adapter = tl.sum((cum <= pid).to(tl.int32), axis=0)
    mine = ids == adapter
    first_tile = tl.sum(tl.where(mine, cum - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(mine, start, 0), axis=0) + (pid - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, end, 0), axis=0)
    return adapter, row0, row_end
