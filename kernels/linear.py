"""Fused linear: ``out = g_out * (a @ (g_in * b) + scale * keep * (l @ lb)) + bias``, one pass.

One kernel family for the forward (``y = x W^T + s T B^T + bias``) and the input gradient
(``dx = dy W + keep * (dS A) / (1 - p)``): the low-rank term and the bias are added to the
tile's accumulator before the single store of the output, so no ``M x N`` LoRA temporary
exists. DoRA adds the column factor ``g``: on the output columns in the forward
(``g_out``), on dY's columns (the reduction dimension, ``g_in``) in the dx pass.

``QUANT4``: b is a bitsandbytes 4-bit weight (``descriptors.Quant4``), W^T in the forward, W in the
dx pass; each ``[BLOCK_K, BLOCK_N]`` tile of b is dequantized in registers (``dequant4_tile``)
right where the 16-bit kernel loads it, and a's tile is cast to the compute dtype, so the
dequantized ``N x K`` weight never exists in memory.

``IN_PLACE`` turns the same kernel into the epilogue of someone else's GEMM: the tile's
accumulator starts from ``out`` (which already holds ``a @ b``, from cuBLAS) instead of
running the K loop, so ``cublas_linear`` adds the low-rank term, g and the bias to the
cuBLAS output without an ``M x N`` temporary.

``MULTI`` makes it the multi-adapter GEMM (``multi_fused_linear``): the base GEMM is tiled
over *all* rows, so each tile reads its slab of W once whatever adapters its rows use,
and the tile adds each row's own adapter's low-rank term in its prologue, over that
adapter's real rank only, in one of two ways (``multi_meta.RowMap``):

* sorted rows (x rows gathered, output rows scattered through ``perm``): a loop over the
  tile's segments (runs of rows with one adapter; a tile of sorted rows holds few), each a
  tensor-core dot kept on its own rows;
* ``GATHER`` (decode: rows in batch order, nothing sorted): every row gathers its own
  adapter's rows of lb, on CUDA cores.

The same kernel computes the multi-adapter input gradient (``dx = (g dY) W + drop'(dS
A_a)``): g scales the rows of dY (``SCALE_IN``) and the low-rank term carries the dropout
keep-mask of each row's adapter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (FP32_GEMM_SHAPES, Launch, configs, dora_g, dropout_keep,
                     fp32_precision, gemm_configs, grouped_tile, low_rank_tile, m_bucket,
                     on_device, tune)
from .descriptors import BankTerm, DoraBank, Quant4, Term, mat
from .multi_meta import tile_rows
from .quant4 import dequant4_tile


_SMALL = [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (32, 128, 128, 4, 4), (16, 64, 128, 4, 5),
          (16, 32, 256, 4, 4),
          # decode (M <= 16): N / BLOCK_N programs must fill the GPU to stream W at full bandwidth
          (16, 16, 512, 4, 3)]
# By kind of launch. "heavy": an fp32 low-rank term (tf32x3 splits) or the dropout
# keep-mask next to the accumulator need registers that 128-register-per-thread
# accumulators leave no room for (they spill, see check-kernels); 8 warps halve the
# accumulator per thread. "fp32": fp32 x and W.
_CONFIGS = {"light": gemm_configs([(128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                   (64, 256, 64, 4, 4)] + _SMALL),
            "heavy": gemm_configs([(128, 128, 64, 8, 3)] + _SMALL),
            "fp32": gemm_configs(FP32_GEMM_SHAPES)}


# 4-bit weights (QUANT4), by (kind, aligned). The dequantization's codes and scales sit in
# registers beside the accumulator: no tile wider than 128 x 128, K steps of 64 for 64-row
# tiles, 16-row tiles at most 64 x 128 or 32 x 256 (larger ones spill on sm_80, check-kernels:
# 128 x 256, 64 x 128 x 128, 16 x 64 x 256 all did). Decode (M <= 16): 16-row tiles,
# column tiles narrow enough that N / BLOCK_N programs stream the packed weight from every
# SM, long K steps. Blocks that straddle rows (K not a multiple of the blocksize: odd
# shapes) keep more scales per row: small tiles.
_Q4_DECODE = [(16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 32, 128, 4, 5)]
_Q4_ODD = [(64, 64, 64, 4, 3), (16, 32, 128, 4, 4)]
_Q4_SHAPES = {True: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4)] + _Q4_DECODE, False: _Q4_ODD}
_Q4_CONFIGS = {(kind, aligned): gemm_configs(FP32_GEMM_SHAPES if kind == "fp32" else shapes)
               for kind in ("light", "heavy", "fp32") for aligned, shapes in _Q4_SHAPES.items()}


def kind(a: torch.dtype, lb: torch.dtype | None, dropout: bool) -> str:
    """Which configs a launch takes: ``a``/``lb`` the GEMM's and the low-rank term's
    operand dtypes (None: no low-rank term)."""
    if a == torch.float32:
        return "fp32"
    return "heavy" if dropout or lb == torch.float32 else "light"


@triton.jit
def _segment_low_rank(l_rows, stride_lr, lb_ptr, row_off, row_rank, keys, has_adapter, cols,
                      col_in, stride_lbr, stride_lbn, first, PRECISION: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The low-rank term of a tile of sorted rows (positions ``first ..``): the tile's
    adapters come in runs (segments), base rows last; one tensor-core dot per segment over
    its adapter's real rank, kept on that segment's rows only. The per-row adapter
    metadata is loaded once as vectors, so the loop issues no dependent scalar loads."""
    pos = first + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
            # the dot adds 0 * lb to the other segments' rows: a NaN or Inf in this
            # adapter's B must not reach them (tenant isolation), so they keep their sums
            acc = tl.where(in_seg[:, None], tl.dot(lt.to(lb.dtype), lb, acc,
                                                   input_precision=PRECISION), acc)
        start = tl.min(tl.where(keys > adapter, pos, first + BLOCK_M), axis=0)
    return acc


@triton.jit
def _gathered_low_rank(l_rows, stride_ls, chunks, stride_lr, lb_ptr, row_off, row_rank, cols,
                       col_in, stride_lbr, stride_lbn, GATHER_R: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The low-rank term of a tile of gathered rows: every row its own adapter's rows of lb,
    ``sum_r l[m, r] * lb[off[a_m] + r, :]`` on CUDA cores in rank chunks of GATHER_R (a
    tile of distinct adapters costs one round trip to memory per chunk, not one per
    adapter). l holds ``chunks`` partial sums (the gathered shrink's K chunks)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, tl.max(row_rank, axis=0), GATHER_R):
        ranks = r0 + tl.arange(0, GATHER_R)
        rank_in = ranks[None, :] < row_rank[:, None]
        lt = tl.zeros((BLOCK_M, GATHER_R), dtype=tl.float32)
        for c in range(0, chunks):
            lt += tl.load(l_rows + c * stride_ls + ranks[None, :] * stride_lr, mask=rank_in,
                          other=0.0)
        lb_rows = (row_off[:, None] + ranks[None, :])[:, :, None] * stride_lbr
        lb = tl.load(lb_ptr + lb_rows + cols[None, None, :] * stride_lbn,
                     mask=rank_in[:, :, None] & col_in[None, None, :], other=0.0)
        lt = lt.to(lb.dtype).to(tl.float32)
        acc += tl.sum(lt[:, :, None] * lb.to(tl.float32), axis=1)
    return acc


@triton.jit
def _lora_linear_kernel(a, b, out, low, bias, g, M, N, K, R, M_BUCKET,
                        HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, SCALE_OUT: tl.constexpr,
                        SCALE_IN: tl.constexpr, IN_PLACE: tl.constexpr, QUANT4: tl.constexpr,
                        MULTI: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        GATHER_R: tl.constexpr = 16):
    """a ``[M, K]`` and b ``[K, N]`` (``Mat``, same 16/32-bit float dtype), out ``[M, N]``
    (``Mat``), bias ``[N]`` or None; sizes M, N, K, R (the rank; M_BUCKET only keys the
    autotuning). Accumulates in fp32.

    low (HAS_LORA): one adapter's ``descriptors.Term`` (l ``[M, R]`` fp32, lb ``[R, N]``
    in the adapter dtype, the low-rank dot running in it), with DROPOUT masked by the
    keep-mask of an ``[M, N]`` input (the dx pass, where N is the layer's K). g: DoRA's
    column factor ``[N]`` (SCALE_OUT) or ``[K]`` (SCALE_IN), fp32, else None. IN_PLACE:
    out holds ``a @ b`` already; a, b are None.

    MULTI (per-row adapters, ``multi_meta``): low a ``descriptors.BankTerm`` (packed lb
    ``[S, N]``, l ``[chunks, M, R]`` already scaled, the rows sorted or, ``low.rows.GATHER``,
    in batch order; DROPOUT: each adapter's p), g a ``DoraBank`` with SCALE_OUT / SCALE_IN.

    QUANT4 (0: b dense): b is a 4-bit weight W (``descriptors.Quant4``), b = W^T (W ``[N,
    K]``, QUANT4 = 1: the forward) or b = W (W ``[K, N]``, QUANT4 = 2: the dx pass). The dot
    runs in its compute dtype (a may be of another float dtype, e.g. fp32 activations over
    a bf16 compute dtype).
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                  GROUP_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < N
    # The low-rank term goes in first, so that a single [BLOCK_M, BLOCK_N] accumulator is
    # live at a time (an epilogue would hold a second one next to the GEMM's: spills).
    if MULTI:
        rows, row_in, keys, has_adapter = tile_rows(tile_m * BLOCK_M, M, low.rows.index,
                                                    low.rows.perm, low.rows.keys, low.rows.n,
                                                    BLOCK_M, low.rows.GATHER)
        row_rank = tl.load(low.ranks + keys, mask=has_adapter, other=0)
        row_off = tl.load(low.offsets + keys, mask=has_adapter, other=0).to(tl.int64)
        l_rows = low.l.ptr + rows[:, None] * low.l.stride0
        if low.rows.GATHER:
            acc = _gathered_low_rank(l_rows, low.stride_chunk, low.chunks, low.l.stride1,
                                     low.lb.ptr, row_off, row_rank, cols, col_in,
                                     low.lb.stride0, low.lb.stride1, GATHER_R, BLOCK_M, BLOCK_N)
        else:
            acc = _segment_low_rank(l_rows, low.l.stride1, low.lb.ptr, row_off, row_rank, keys,
                                    has_adapter, cols, col_in, low.lb.stride0, low.lb.stride1,
                                    tile_m * BLOCK_M, PRECISION, low.BLOCK_R, BLOCK_M, BLOCK_N)
        if DROPOUT:
            p = tl.load(low.p + keys, mask=has_adapter, other=0.0)[:, None]
            keep = dropout_keep(tl.load(low.seed), rows, tile_n * BLOCK_N, N, p, BLOCK_N)
            acc = tl.where(keep, acc / (1.0 - p), 0.0)
        key = keys[:, None].to(tl.int64)
        dora = has_adapter[:, None]
        if SCALE_OUT or SCALE_IN:
            dora = dora & (tl.load(g.flags + key, mask=dora, other=0) != 0)
    else:
        rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < M
        key = 0
        dora = False
        if HAS_LORA:
            acc = low_rank_tile(low.l.ptr, low.lb.ptr, rows, cols, row_in, col_in, R,
                                low.l.stride0, low.l.stride1, low.lb.stride0, low.lb.stride1,
                                low.scale, low.seed, low.dropout_p, tile_n * BLOCK_N, N, DROPOUT,
                                low.BLOCK_R, BLOCK_N, PRECISION)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    out_ptrs = out.ptr + rows[:, None] * out.stride0 + cols[None, :] * out.stride1
    out_in = row_in[:, None] & col_in[None, :]
    if IN_PLACE:
        acc += tl.load(out_ptrs, mask=out_in, other=0.0).to(tl.float32)
    else:
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a.ptr + rows[:, None] * a.stride0 + ks[None, :] * a.stride1
        if QUANT4 == 0:
            b_ptrs = b.ptr + ks[:, None] * b.stride0 + cols[None, :] * b.stride1
        for k0 in range(0, K, BLOCK_K):
            k_in = ks < K - k0
            a_tile = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
            if QUANT4 == 2:  # rows k0.. of W, columns of this tile
                b_tile = dequant4_tile(b.data, b.absmax, b.code, b.absmax2, b.code2, b.offset,
                                   k0 + ks.to(tl.int64), k_in, tile_n * BLOCK_N, N, False,
                                   b.DTYPE, BLOCK_N, b.BLOCKSIZE, b.BLOCKSIZE2, b.ALIGNED)
            elif QUANT4 == 1:
                b_tile = dequant4_tile(b.data, b.absmax, b.code, b.absmax2, b.code2, b.offset,
                                   cols, col_in, k0, K, True, b.DTYPE, BLOCK_K, b.BLOCKSIZE,
                                   b.BLOCKSIZE2, b.ALIGNED)
            else:
                b_tile = tl.load(b_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
                b_ptrs += BLOCK_K * b.stride0
            if SCALE_IN:
                g_in = dora_g(g, key, dora, k0 + ks, k_in, MULTI)
                a_tile = (a_tile.to(tl.float32) * g_in).to(b_tile.dtype)
            else:
                a_tile = a_tile.to(b_tile.dtype)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * a.stride1
    if SCALE_OUT:
        acc *= dora_g(g, key, dora, cols, col_in, MULTI)
    if bias is not None:
        acc += tl.load(bias + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out.ptr.dtype.element_ty), mask=out_in)


_KEY = ["M_BUCKET", "N", "K", "R", "HAS_LORA", "DROPOUT", "QUANT4"]
KERNELS = {k: tune(_lora_linear_kernel, c, _KEY) for k, c in _CONFIGS.items()}
Q4_KERNELS = {k: tune(_lora_linear_kernel, c, _KEY) for k, c in _Q4_CONFIGS.items()}
# The in-place pass streams out once (read, add, write) plus the rank-r product: tiles of
# an elementwise kernel, no K loop (BLOCK_K unused), one config set for every dtype.
# Autotuning runs it repeatedly on the same output, hence restore_value.
IN_PLACE_KERNEL = tune(
    _lora_linear_kernel,
    configs(("BLOCK_M", "BLOCK_N"), [(128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 2),
                                     (32, 128, 4, 2), (16, 128, 4, 2), (16, 256, 4, 2)],
            dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4), BLOCK_K=16, GROUP_M=8),
    ["M_BUCKET", "N", "R", "HAS_LORA", "DROPOUT", "SCALE_OUT"], restore=["out"])


def b_shape(b: torch.Tensor | Quant4) -> tuple[int, int]:
    """The ``[K, N]`` shape of a GEMM's b operand, dense or 4-bit."""
    return b.b_shape if isinstance(b, Quant4) else (b.shape[0], b.shape[1])


def _gemm_args(a: torch.Tensor, b: torch.Tensor | Quant4, bias: torch.Tensor | None,
               out: torch.Tensor, in_place: bool) -> dict:
    """The kernel arguments of the base GEMM (a ``[M, K]`` @ b ``[K, N]`` + bias -> out): a,
    b, out (``Mat``; a 4-bit b as itself, with its QUANT4 mode; in place: a and b None,
    never read), bias, the sizes and the precision."""
    (m, k), n = a.shape, b_shape(b)[1]
    if isinstance(b, Quant4):
        b_desc, mode = b, (1 if b.TRANSPOSED.value else 2)
    else:
        b_desc, mode = mat(b), 0
    return dict(a=None if in_place else mat(a), b=None if in_place else b_desc, QUANT4=mode,
                out=mat(out), bias=bias, M=m, N=n, K=k, M_BUCKET=m_bucket(m),
                PRECISION=fp32_precision())


# where a launch plan's per-call tensors sit in the descriptors (``Launch.slots``)
_SLOTS = {"a_ptr": ("a", "ptr"), "b_ptr": ("b", "ptr"), "out_ptr": ("out", "ptr"),
          "bias_ptr": ("bias",), "l_ptr": ("low", "l", "ptr"), "lb_ptr": ("low", "lb", "ptr"),
          "seed_ptr": ("low", "seed"), "index_ptr": ("low", "rows", "index")}


def linear_launch(a: torch.Tensor, b: torch.Tensor | Quant4, low: Term | None,
                  bias: torch.Tensor | None, out: torch.Tensor, g_out: torch.Tensor | None = None,
                  g_in: torch.Tensor | None = None, in_place: bool = False) -> Launch:
    """The launch of ``fused_linear`` (``in_place``: of ``cublas_linear``'s pass) writing
    out ``[M, N]`` (M, N > 0); low: one adapter's term (``descriptors.term``) or None. Its
    tensors (``Launch.slots``): a_ptr, b_ptr, l_ptr, lb_ptr, bias_ptr, out_ptr, seed_ptr."""
    if g_out is not None and g_in is not None:
        raise ValueError("the fused linear takes g_out or g_in, not both")
    m, n = out.shape
    dropout = low is not None and low.seed is not None
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    gemm = _gemm_args(a, b, bias, out, in_place)
    lb_dtype = low.lb.ptr.dtype if low is not None else None
    if gemm["QUANT4"]:
        kernel = Q4_KERNELS[kind(b.dtype, lb_dtype, dropout), b.ALIGNED.value]
    else:
        kernel = IN_PLACE_KERNEL if in_place else KERNELS[kind(a.dtype, lb_dtype, dropout)]
    return Launch(kernel, grid, dict(
        **gemm, low=low, R=0 if low is None else low.l.ptr.shape[1],
        g=g_out if g_out is not None else g_in, HAS_LORA=low is not None, DROPOUT=dropout,
        SCALE_OUT=g_out is not None, SCALE_IN=g_in is not None, IN_PLACE=in_place,
        MULTI=False), _SLOTS)


def _launch(a: torch.Tensor, b: torch.Tensor | Quant4, low: Term | None,
            bias: torch.Tensor | None, out: torch.Tensor, g_out: torch.Tensor | None,
            g_in: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    if out.shape[0] and out.shape[1]:
        linear_launch(a, b, low, bias, out, g_out, g_in, in_place)()
    elif g_out is not None and g_in is not None:
        raise ValueError("the fused linear takes g_out or g_in, not both")
    return out


@on_device
def fused_linear(a: torch.Tensor, b: torch.Tensor | Quant4, low: Term | None = None,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                 g_out: torch.Tensor | None = None, g_in: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``g_out * (a @ (g_in * b) + low-rank term) + bias``: a ``[M, K]``, b ``[K, N]`` (any
    strides; or a 4-bit ``Quant4``, W^T or W, whose tiles are dequantized in the
    kernel: the dot runs in its compute dtype), low the low-rank term (``descriptors.term``)
    or None, the optional DoRA factors g_out ``[N]`` / g_in ``[K]`` contiguous fp32."""
    out = torch.empty((a.shape[0], b_shape(b)[1]), dtype=out_dtype or a.dtype, device=a.device)
    return _launch(a, b, low, bias, out, g_out, g_in, in_place=False)


def cublas_unsupported(a: torch.Tensor, out_dtype: torch.dtype | None = None,
                       g_in: torch.Tensor | None = None) -> str | None:
    """Why ``cublas_linear`` cannot take these arguments, or None."""
    if g_in is not None:
        return ("g_in scales the reduction dimension (DoRA's dx pass): the cuBLAS product "
                "would need a scaled M x N copy of dY")
    if out_dtype is not None and out_dtype != a.dtype:
        return f"torch.mm returns {a.dtype}, not the requested {out_dtype}"
    return None


@on_device
def cublas_linear(a: torch.Tensor, b: torch.Tensor, low: Term | None = None,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                  g_out: torch.Tensor | None = None, g_in: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``fused_linear``'s result with the base product ``a @ b`` from ``torch.mm`` (cuBLAS on
    CUDA); the kernel then adds the low-rank term (dropout in-kernel), g_out and the bias
    into that output in place. No g_in (see ``cublas_unsupported``)."""
    reason = cublas_unsupported(a, out_dtype, g_in)
    if reason:
        raise ValueError(f"cublas_linear: {reason}")
    out = torch.mm(a, b)
    if low is None and bias is None and g_out is None:
        return out
    return _launch(a, b, low, bias, out, g_out, None, in_place=True)


# The multi-adapter GEMM's tiles per path ("sorted"; "scale_in": DoRA's dx pass, which also
# streams fp32 tiles of the magnitude and the weight norm per step, so fewer stages and
# more warps; "gather": decode, whose prologue holds
# [BLOCK_M, GATHER_R, BLOCK_N] products, so small column tiles and rank chunks that shrink
# as the row tiles grow). Shapes (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), gather ones
# (BLOCK_M, BLOCK_N, BLOCK_K, GATHER_R, warps, stages). The 128 x 64 sorted tile takes 8
# warps: with 4, the dx pass with fp32 adapters and dropout spilled 128 B/thread on sm_80
# under Triton 3.6 (check-kernels).
_MULTI_SHAPES = {
    "sorted": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4),
               (32, 128, 128, 4, 4), (16, 64, 128, 4, 5),
               # decode: N / BLOCK_N programs must fill the GPU to stream W at full bandwidth
               (16, 16, 512, 4, 3)],
    "scale_in": [(64, 128, 64, 8, 3), (64, 64, 64, 8, 3), (128, 64, 32, 8, 2), (16, 64, 128, 4, 4),
                 (16, 32, 128, 4, 3)],
}
_GATHER_SHAPES = {False: [(16, 16, 512, 16, 4, 3), (16, 32, 256, 16, 4, 3), (32, 32, 256, 8, 4, 3),
                          (64, 32, 128, 4, 8, 3)],
                  True: [(16, 32, 64, 16, 4, 3), (16, 64, 64, 8, 4, 3), (32, 32, 64, 8, 4, 3)]}
_MULTI_KEY = ["M_BUCKET", "N", "K", "R", "DROPOUT", "SCALE_OUT", "SCALE_IN"]
_INTERP = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)


def _gather_configs(shapes):
    return configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GATHER_R"), shapes,
                   dict(_INTERP, BLOCK_M=16, GATHER_R=8), GROUP_M=8)


# keyed by (path, fp32 x and W); fp32 x and W (tf32x3 GEMM) take short K steps everywhere
MULTI_KERNELS = {
    **{(path, False): tune(_lora_linear_kernel, gemm_configs(shapes), _MULTI_KEY)
       for path, shapes in _MULTI_SHAPES.items()},
    **{(path, True): tune(_lora_linear_kernel, gemm_configs(FP32_GEMM_SHAPES), _MULTI_KEY)
       for path in _MULTI_SHAPES},
    **{("gather", fp32): tune(_lora_linear_kernel, _gather_configs(shapes), _MULTI_KEY)
       for fp32, shapes in _GATHER_SHAPES.items()},
}


def multi_linear_launch(a: torch.Tensor, b: torch.Tensor, low: BankTerm,
                        bias: torch.Tensor | None, out: torch.Tensor,
                        g_out: DoraBank | None = None, g_in: DoraBank | None = None) -> Launch:
    """The launch of ``multi_fused_linear`` writing out ``[M, N]`` (M, N > 0). Its
    per-batch tensors (``Launch.slots``): a_ptr, b_ptr, l_ptr, bias_ptr, out_ptr,
    seed_ptr, index_ptr (gathered rows)."""
    if g_out is not None and g_in is not None:
        raise ValueError("multi_fused_linear scales the output or the input, not both")
    m, n = out.shape
    dropout = low.seed is not None
    path = "scale_in" if g_in is not None else "gather" if low.rows.GATHER.value else "sorted"
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    return Launch(MULTI_KERNELS[path, a.dtype == torch.float32], grid, dict(
        **_gemm_args(a, b, bias, out, False), low=low, R=low.l.ptr.shape[2],
        g=g_out if g_out is not None else g_in, HAS_LORA=True, DROPOUT=dropout,
        SCALE_OUT=g_out is not None, SCALE_IN=g_in is not None, IN_PLACE=False, MULTI=True),
        _SLOTS)


@on_device
def multi_fused_linear(a: torch.Tensor, b: torch.Tensor, low: BankTerm,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                       g_out: DoraBank | None = None, g_in: DoraBank | None = None
                       ) -> torch.Tensor:
    """``g * (a @ b + low-rank term) + bias`` with per-row adapters: a ``[M, K]``, b
    ``[K, N]`` (any strides), low the bank's term (``descriptors.bank_term``); with a DoRA
    bank's factors (``descriptors.dora_bank``), each row's adapter's g scales the output
    (``g_out``: the forward) or a's columns (``g_in``: the dx pass)."""
    if g_out is not None and g_in is not None:
        raise ValueError("multi_fused_linear scales the output or the input, not both")
    out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype or a.dtype, device=a.device)
    if out.shape[0] and out.shape[1]:
        multi_linear_launch(a, b, low, bias, out, g_out, g_in)()
    return out
