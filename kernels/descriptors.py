"""Typed kernel arguments: one NamedTuple per concept, made once by a launcher and passed
unchanged into the ``@triton.jit`` kernels, which read their members by name (``a.ptr``,
``low.lb.stride0``).

Triton passes a tuple argument as its members: tensors as pointers, ints as i32 (1
specialized to a constant, as for flat arguments), ``None`` as an absent constexpr member,
``tl.constexpr`` members as compile-time values. An absent feature is a ``None`` descriptor
(or member) beside the one constexpr flag the kernel branches on: Triton 3.6 cannot compare a
tuple with None in a kernel (``if low is not None`` fails to compile when ``low`` is a
tuple), so kernels test the flag, never the descriptor. Flags that pick autotune configs
stay top-level kernel arguments too: Triton's autotuner keys on argument names. The
ahead-of-time signatures (``kernels.aot``) name the same NamedTuples with type strings in
place of the members.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton.language as tl

from .common import TL_DTYPES
from .quant4 import Quant4Args


class Mat(NamedTuple):
    """A 2-D tensor (any float or integer dtype) and its strides in elements along its two
    dimensions."""
    ptr: torch.Tensor
    stride0: int
    stride1: int


def mat(t: torch.Tensor) -> Mat:
    """``t`` (2-D) as a ``Mat``."""
    return Mat(t, t.stride(0), t.stride(1))


class Term(NamedTuple):
    """One adapter's low-rank term ``scale * keep * (l @ lb)`` for the fused linear: l
    ``[M, R]`` fp32, lb ``[R, N]`` (adapter dtype, the dot runs in it). seed int64 ``[1]``
    on the device and dropout_p (fp32) the keep-mask of an ``[M, N]`` input, seed None
    without dropout. BLOCK_R (constexpr): the rank tile."""
    l: Mat
    lb: Mat
    scale: float
    seed: torch.Tensor | None
    dropout_p: float
    BLOCK_R: tl.constexpr


class Rows(NamedTuple):
    """Which adapter each row of a multi-adapter batch uses (``multi_meta.RowMap``), int32 on
    the device: GATHER (constexpr) rows in batch order, ``index`` ``[M]`` (-1: base only;
    perm, keys None); else sorted positions, ``perm`` ``[M]`` (row of each position) and
    ``keys`` ``[M]`` (its adapter; index None). n: the bank's adapter slots."""
    index: torch.Tensor | None
    perm: torch.Tensor | None
    keys: torch.Tensor | None
    n: int
    GATHER: tl.constexpr


def rows_view(row_map) -> Rows:
    """A ``multi_meta.RowMap`` as tiles of positions read it (sorted rows: perm and keys)."""
    if row_map.gather:
        return Rows(row_map.index, None, None, row_map.n, tl.constexpr(True))
    g = row_map.groups
    return Rows(None, g.perm, g.keys, row_map.n, tl.constexpr(False))


class Segments(NamedTuple):
    """A multi-adapter batch over segment tiles of sorted rows (``multi_meta.segment_tile``),
    int32 on the device: perm ``[M]`` (the row of each sorted position), seg (adapter a's
    positions ``seg[a] .. seg[a + 1]``), the bank's offsets and ranks ``[n]`` (adapter a's
    rows ``offsets[a] .. offsets[a] + ranks[a]`` of the packed gradients) and its scales
    fp32 ``[n]``. n: the bank's adapter slots; N_POW2 (constexpr): a power of two >= n."""
    perm: torch.Tensor
    seg: torch.Tensor
    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    n: int
    N_POW2: tl.constexpr


def segments(row_map, bank) -> Segments:
    """The segment tiles of a ``multi_meta.RowMap`` (sorted rows) over an ``AdapterMeta``."""
    rows = row_map.kwargs()
    return Segments(rows["perm_ptr"], rows["seg_ptr"], bank.offsets, bank.ranks, bank.scales,
                    row_map.n, tl.constexpr(rows["N_POW2"]))


class BankTerm(NamedTuple):
    """The low-rank term of a multi-adapter batch (``linear.MultiLowRank``): l ``[chunks, M,
    R]`` fp32 (rows in batch order, R the largest rank, already scaled; ``l`` its
    ``[M, R]`` slice 0 and ``stride_chunk`` the step to the next partial sum), the packed lb
    ``[S, N]``, each adapter a's rows ``offsets[a] .. offsets[a] + ranks[a]`` (int32
    ``[n]``), the batch's ``rows``. p fp32 ``[n]`` and seed int64 ``[1]``: each adapter's
    dropout keep-mask of an ``[M, N]`` input, both None without dropout. BLOCK_R
    (constexpr): the rank tile."""
    l: Mat
    stride_chunk: int
    chunks: int
    lb: Mat
    rows: Rows
    offsets: torch.Tensor
    ranks: torch.Tensor
    p: torch.Tensor | None
    seed: torch.Tensor | None
    BLOCK_R: tl.constexpr


class DoraBank(NamedTuple):
    """DoRA's factors of a multi-adapter bank (``multi_meta.AdapterMeta``): adapter a's
    ``g = magnitude[a] / weight_norm[a]`` where ``flags[a]`` (int8) is nonzero, else 1;
    magnitude ``[n, N]`` (any float) and weight_norm fp32 ``[n, N]``, unit column stride,
    their row strides beside them."""
    magnitude: torch.Tensor
    stride_mag: int
    weight_norm: torch.Tensor
    stride_norm: int
    flags: torch.Tensor


def dora_bank(meta) -> DoraBank:
    """The DoRA facts of an ``AdapterMeta`` that has them."""
    return DoraBank(meta.magnitude, meta.magnitude.stride(0), meta.weight_norm,
                    meta.weight_norm.stride(0), meta.flags)


class Quant4(NamedTuple):
    """A bitsandbytes 4-bit weight W ``[N, K]`` as the kernels read it (``Quant4Args``):
    data uint8 ``[ceil(N*K / 2)]``, absmax (fp32, or uint8 codes when nested), code fp32
    ``[16]``; nested only (else None): absmax2 fp32, code2 fp32 ``[256]``, offset fp32
    ``[1]``. Constexprs: DTYPE the compute dtype (``tl`` dtype), BLOCKSIZE, BLOCKSIZE2 (0:
    not nested), ALIGNED (K a multiple of BLOCKSIZE)."""
    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    DTYPE: tl.constexpr
    BLOCKSIZE: tl.constexpr
    BLOCKSIZE2: tl.constexpr
    ALIGNED: tl.constexpr


def quant4_view(q: Quant4Args) -> Quant4:
    """The kernel view of a 4-bit weight."""
    c = q.constexprs()
    return Quant4(q.data, q.absmax, q.code, q.absmax2, q.code2, q.offset,
                  tl.constexpr(TL_DTYPES[q.dtype]), tl.constexpr(c["Q4_BLOCKSIZE"]),
                  tl.constexpr(c["Q4_BLOCKSIZE2"]), tl.constexpr(c["Q4_ALIGNED"]))
