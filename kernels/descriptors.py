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

from .common import TL_DTYPES, next_pow2, rank_block


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


def term(l: torch.Tensor, lb: torch.Tensor, scale: float, dropout_p: float = 0.0,
         seed: torch.Tensor | None = None) -> Term:
    """One adapter's low-rank term ``scale * keep * (l @ lb)``: l ``[M, r]`` fp32, lb ``[r,
    N]`` (any strides); ``dropout_p > 0`` masks it with the keep-mask of ``seed`` (int64
    ``[1]`` on the device) for an ``[M, N]`` input."""
    if dropout_p > 0.0 and seed is None:
        raise ValueError(f"a low-rank term with dropout_p={dropout_p} needs a seed tensor")
    return Term(mat(l), mat(lb), scale, seed if dropout_p > 0.0 else None, dropout_p,
                tl.constexpr(rank_block(l.shape[1])))


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
    rows ``offsets[a] .. offsets[a] + ranks[a]`` of the packed operands and gradients) and
    its scales fp32 ``[n]``. n: the bank's adapter slots; N_POW2 (constexpr): a power of two
    >= n. perm and seg None: the rows are gathered (read through a ``Rows``), not sorted,
    and only the bank's facts are read."""
    perm: torch.Tensor | None
    seg: torch.Tensor | None
    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    n: int
    N_POW2: tl.constexpr


def segments(row_map, bank) -> Segments:
    """The segment tiles of a ``multi_meta.RowMap`` over a ``multi_meta.PackedAdapters``:
    sorted rows, or for gathered ones the bank's facts only (perm, seg None)."""
    if row_map.gather:
        return Segments(None, None, bank.offsets, bank.ranks, bank.scales, row_map.n,
                        tl.constexpr(2))
    return Segments(row_map.groups.perm, row_map.groups.seg, bank.offsets, bank.ranks,
                    bank.scales, row_map.n, tl.constexpr(max(next_pow2(row_map.n), 2)))


class BankTerm(NamedTuple):
    """The low-rank term of a multi-adapter batch (``bank_term``): l ``[chunks, M,
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


def bank_term(l: torch.Tensor, lb: torch.Tensor, bank, rows, seed: torch.Tensor | None = None
              ) -> BankTerm:
    """The prologue term of ``multi_fused_linear``: l ``[chunks, M, R]`` fp32 (summed over
    chunks; rows in batch order, R the largest rank) times each row's adapter's rows of the
    packed lb ``[S, N]``, for the adapters of ``bank`` (``multi_meta.PackedAdapters``) and the
    rows of ``rows`` (``multi_meta.RowMap``). ``seed``: masks the term with the keep-mask of
    an ``[M, N]`` input at each adapter's ``bank.dropout`` (the dx pass); None, or a bank
    without dropout: no mask."""
    dropout = seed is not None and bank.dropout is not None
    return BankTerm(Mat(l, l.stride(1), l.stride(2)), l.stride(0), l.shape[0], mat(lb),
                    rows_view(rows), bank.offsets, bank.ranks, bank.dropout if dropout else None,
                    seed if dropout else None, tl.constexpr(rank_block(l.shape[2])))


class DoraBank(NamedTuple):
    """DoRA's factors of a multi-adapter bank (``multi_meta.PackedAdapters``): adapter a's
    ``g = magnitude[a] / weight_norm[a]`` where ``flags[a]`` (int8 ``[n]``: the bank's
    is_dora viewed as int8) is nonzero, else 1; magnitude ``[n, N]`` (any float) and
    weight_norm fp32 ``[n, N]``, unit column stride, their row strides beside them."""
    magnitude: torch.Tensor
    stride_mag: int
    weight_norm: torch.Tensor
    stride_norm: int
    flags: torch.Tensor


def dora_bank(bank) -> DoraBank | None:
    """The DoRA facts of a ``multi_meta.PackedAdapters``, None when it has none."""
    if bank.is_dora is None:
        return None
    return DoraBank(bank.magnitude, bank.magnitude.stride(0), bank.weight_norm,
                    bank.weight_norm.stride(0), bank.is_dora.view(torch.int8))


class Quant4(NamedTuple):
    """A bitsandbytes 4-bit weight W ``[N, K]`` (layout: ``kernels.quant4``), the one form
    launchers and kernels share: data uint8 ``[ceil(N*K / 2)]``, absmax ``[ceil(N*K /
    BLOCKSIZE)]`` (fp32, or uint8 codes when nested), code fp32 ``[16]``; nested only (else
    None): absmax2 fp32 ``[ceil(blocks / BLOCKSIZE2)]``, code2 fp32 ``[256]``, offset fp32
    ``[1]``. All contiguous, on one device. N, K: W's shape (the kernels take their sizes
    as arguments of their own; these serve the launchers). Constexprs: DTYPE the compute
    dtype the tiles are dequantized to (``tl`` dtype), BLOCKSIZE, BLOCKSIZE2 (0: not
    nested), ALIGNED (K a multiple of BLOCKSIZE: a block never straddles rows), TRANSPOSED:
    as a GEMM's b operand, ``W^T`` ``[K, N]`` (the forward) rather than W (the dx pass)."""
    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    N: int
    K: int
    DTYPE: tl.constexpr
    BLOCKSIZE: tl.constexpr
    BLOCKSIZE2: tl.constexpr
    ALIGNED: tl.constexpr
    TRANSPOSED: tl.constexpr

    @classmethod
    def from_parts(cls, data: torch.Tensor, quant: list[torch.Tensor], meta: list[int],
                   dtype: torch.dtype | None) -> "Quant4":
        """From a 4-bit weight as the custom ops carry it: packed data, quant ``[absmax,
        code]`` (``+ [absmax2, code2, offset]`` when nested), meta ``[N, K, blocksize,
        blocksize2]``, the compute dtype (fp16, bf16 or fp32; None: fp32, for a weight no
        GEMM reads, such as DoRA's norm pass, which dequantizes in fp32)."""
        n, k, blocksize, blocksize2 = meta
        absmax, code, *nested = quant
        absmax2, code2, offset = nested or (None, None, None)
        return cls(data, absmax, code, absmax2, code2, offset, n, k,
                   tl.constexpr(TL_DTYPES[dtype or torch.float32]), tl.constexpr(blocksize),
                   tl.constexpr(blocksize2 if nested else 0),
                   tl.constexpr(k % blocksize == 0), tl.constexpr(False))

    @property
    def shape(self) -> tuple[int, int]:
        """W's shape ``[N, K]``."""
        return (self.N, self.K)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype."""
        return next(t for t, d in TL_DTYPES.items() if d == self.DTYPE.value)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    def t(self) -> "Quant4":
        """The same weight as the other operand: W^T for W and back (no copy)."""
        return self._replace(TRANSPOSED=tl.constexpr(not self.TRANSPOSED.value))

    @property
    def b_shape(self) -> tuple[int, int]:
        """The shape as a GEMM's b: ``[K, N]`` when transposed, else ``[N, K]``."""
        return (self.K, self.N) if self.TRANSPOSED.value else (self.N, self.K)
