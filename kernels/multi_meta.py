"""Launch metadata of multi-adapter batches: which adapter each row uses (``RowMap``), the
bank's per-adapter facts (``PackedAdapters``), and the jit helpers that read them.

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

from dataclasses import dataclass, replace

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


@dataclass(frozen=True, eq=False)
class PackedAdapters:
    """n adapters of one base layer (weight ``[N, K]``), packed along the rank: the one type
    of a multi-adapter bank's per-adapter facts, public (``fastlora.PackedAdapters``, made by
    ``fastlora.adapters.packed.pack_adapters``) and read by the launchers.

    A ``[S, K]``, B ``[S, N]`` (lora_B transposed), same float dtype: adapter a owns rows
    ``offsets[a] .. offsets[a] + ranks[a]`` of both; offsets, ranks ``[n]`` int32 (rank 0: the
    adapter adds nothing to this layer); scales ``[n]`` fp32; ``max_rank`` >= every rank
    (static: it sizes a ``[M, max_rank]`` fp32 buffer). DoRA: magnitude ``[n, N]`` (any
    float), weight_norm ``[n, N]`` fp32 (the detached ``||W + s B A||``; 1 in rows of plain
    adapters) and is_dora ``[n]`` bool (True: ``g = magnitude / weight_norm``, else g = 1),
    all three or none; the kernels read magnitude and weight_norm with unit column stride and
    is_dora as int8 (``descriptors.dora_bank``). dropout: ``[n]`` fp32 probabilities applied
    in training, or None (no dropout; what a launch sees in eval). ``dora_dropout``: a host
    fact fixed at packing, True when some DoRA adapter has dropout > 0 (such a batch runs the
    PyTorch reference in training); checked against the tensors when they are on the CPU.
    ``slots``: the slot table of the ``AdapterBank`` the adapters live in (a
    ``fastlora.adapters.routing.Slots``, which routings are checked against), or None.
    """
    A: torch.Tensor
    B: torch.Tensor
    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    max_rank: int
    magnitude: torch.Tensor | None = None
    weight_norm: torch.Tensor | None = None
    is_dora: torch.Tensor | None = None
    dropout: torch.Tensor | None = None
    dora_dropout: bool = False
    slots: object | None = None  # a fastlora Slots (kernels import nothing of fastlora)

    def __post_init__(self):
        n = self.offsets.shape[0] if self.offsets.dim() == 1 else -1
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[0]:
            raise ValueError(f"bank: A must be [S, K] and B [S, N] (lora_B transposed) with the "
                             f"same S, got {tuple(self.A.shape)} and {tuple(self.B.shape)}")
        for name in ("offsets", "ranks"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or tuple(t.shape) != (n,):
                raise ValueError(f"bank: {name} must be int32 [n], got {t.dtype} {tuple(t.shape)}")
        for name in ("scales", "dropout"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32
                                  or tuple(t.shape) != (n,)):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"bank: {name} must be a float32 tensor [{n}], got {got} "
                                 "(pack_adapters takes dropout as floats)")
        dora = (self.magnitude, self.weight_norm, self.is_dora)
        if any(t is None for t in dora) != all(t is None for t in dora):
            raise ValueError("bank: magnitude, weight_norm and is_dora go together (DoRA)")
        if self.magnitude is not None:
            rows = (n, self.B.shape[1])
            if tuple(self.magnitude.shape) != rows or tuple(self.weight_norm.shape) != rows:
                raise ValueError(f"bank: magnitude and weight_norm must be {list(rows)}, got "
                                 f"{list(self.magnitude.shape)} and {list(self.weight_norm.shape)}")
            if self.is_dora.dtype != torch.bool or tuple(self.is_dora.shape) != (n,):
                raise ValueError(f"bank: is_dora must be bool [{n}]")
        if self.offsets.device.type == "cpu" and n > 0 and not torch.compiler.is_compiling():
            self._check_values()

    def _check_values(self) -> None:
        """The value checks (CPU tensors only: on a GPU they would cost a host sync)."""
        off, rk = self.offsets.long(), self.ranks.long()
        if (rk < 0).any() or (rk > self.max_rank).any():
            raise ValueError(f"bank: ranks {self.ranks.tolist()} outside 0..max_rank={self.max_rank}")
        if (off < 0).any() or (off + rk > self.A.shape[0]).any():
            raise ValueError(f"bank: adapter rows (offsets + ranks) exceed A's {self.A.shape[0]} rows")
        cpu = [t.device.type == "cpu" for t in (self.dropout, self.is_dora) if t is not None]
        if not all(cpu):
            return
        if self.dropout is not None and not ((self.dropout >= 0) & (self.dropout < 1)).all():
            raise ValueError(f"bank: dropout must hold probabilities in [0, 1), got "
                             f"{self.dropout.tolist()}")
        on_dora = (self.dropout is not None and self.is_dora is not None
                   and bool(((self.dropout > 0) & self.is_dora).any()))
        if on_dora != self.dora_dropout:
            raise ValueError(f"bank: dora_dropout={self.dora_dropout}, but DoRA adapters with "
                             f"dropout > 0: {on_dora}")

    @classmethod
    def trusted(cls, A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor,
                ranks: torch.Tensor, scales: torch.Tensor, max_rank: int,
                magnitude: torch.Tensor | None, weight_norm: torch.Tensor | None,
                is_dora: torch.Tensor | None, dropout: torch.Tensor | None) -> PackedAdapters:
        """The bank of fields taken from a checked one (the custom op's argument lists),
        without ``__post_init__``'s checks: one launch's view, so dropout is None unless
        this launch applies it, no slot table, and ``dora_dropout`` False (a training batch
        with dropout on DoRA adapters never reaches the kernels)."""
        self = object.__new__(cls)
        self.__dict__.update(A=A, B=B, offsets=offsets, ranks=ranks, scales=scales,
                             max_rank=max_rank, magnitude=magnitude, weight_norm=weight_norm,
                             is_dora=is_dora, dropout=dropout, dora_dropout=False, slots=None)
        return self

    @property
    def n(self) -> int:
        return self.offsets.shape[0]

    def packed(self) -> PackedAdapters:
        return self

    def map(self, fn) -> PackedAdapters:
        """The same bank with ``fn`` applied to A, B and magnitude (e.g. a dtype change)."""
        return replace(self, A=fn(self.A), B=fn(self.B),
                       magnitude=fn(self.magnitude) if self.magnitude is not None else None)


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
