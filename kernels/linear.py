"""Fused linear: ``out = g_out * (a @ (g_in * b) + scale * keep * (l @ lb)) + bias``, one pass.

One kernel family for the forward (``y = x W^T + s T B^T + bias``) and the input gradient
(``dx = dy W + keep * (dS A) / (1 - p)``): the low-rank term and the bias are added to the
tile's accumulator before the single store of the output, so no ``M x N`` LoRA temporary
exists. DoRA adds the column factor ``g``: on the output columns in the forward
(``g_out``), on dY's columns (the reduction dimension, ``g_in``) in the dx pass.

``QUANT4``: b is a bitsandbytes 4-bit weight (``Quant4Args``), W^T in the forward, W in the
dx pass; each ``[BLOCK_K, BLOCK_N]`` tile of b is dequantized in registers (``dequant4_tile``)
right where the 16-bit kernel loads it, and a's tile is cast to the compute dtype, so the
dequantized ``N x K`` weight never exists in memory.

``IN_PLACE`` turns the same kernel into the epilogue of someone else's GEMM: the tile's
accumulator starts from ``out`` (which already holds ``a @ b``, from cuBLAS) instead of
running the K loop, so ``cublas_linear`` adds the low-rank term, g and the bias to the
cuBLAS output without an ``M x N`` temporary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (FP32_GEMM_SHAPES, configs, fp32_precision, gemm_configs, grouped_tile,
                     low_rank_tile, m_bucket, on_device, rank_block, tune)
from .quant4 import DENSE_CONSTEXPRS, Quant4Args, dequant4_tile


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
def _lora_linear_kernel(a_ptr, b_ptr, l_ptr, lb_ptr, bias_ptr, g_ptr, out_ptr, M, N, K, R, M_BUCKET,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr,
                        stride_lbr, stride_lbn, stride_om, stride_on,
                        scale, seed_ptr, dropout_p,
                        q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset,
                        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                        SCALE_OUT: tl.constexpr, SCALE_IN: tl.constexpr, IN_PLACE: tl.constexpr,
                        QUANT4: tl.constexpr, Q4_DX: tl.constexpr, Q4_DTYPE: tl.constexpr,
                        Q4_BLOCKSIZE: tl.constexpr, Q4_BLOCKSIZE2: tl.constexpr,
                        Q4_ALIGNED: tl.constexpr,
                        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """a ``[M, K]`` and b ``[K, N]`` (same 16/32-bit float dtype), l ``[M, R]`` fp32,
    lb ``[R, N]`` (adapter dtype; the low-rank dot runs in it), bias ``[N]``, out ``[M, N]``.

    Accumulates in fp32; with DROPOUT the low-rank term is masked by the keep-mask of an
    ``[M, N]`` input (the dx pass, where N is the layer's K). g ``[N]`` (SCALE_OUT) or
    ``[K]`` (SCALE_IN) is fp32. IN_PLACE: out holds ``a @ b`` already; a, b are not read.

    QUANT4: b_ptr is the packed data of a 4-bit W (``Quant4Args``: the q4_* pointers and
    Q4_* constexprs) and b's strides are unused: b = W^T (W ``[N, K]``) or, with Q4_DX,
    b = W (W ``[K, N]``: the dx pass). The dot runs in Q4_DTYPE (the compute dtype; a may
    be of another float dtype, e.g. fp32 activations over a bf16 compute dtype).
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                  GROUP_M)
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    # The low-rank term goes in first, so that a single [BLOCK_M, BLOCK_N] accumulator is
    # live at a time (an epilogue would hold a second one next to the GEMM's: spills).
    if HAS_LORA:
        acc = low_rank_tile(l_ptr, lb_ptr, rows, cols, row_in, col_in, R, stride_lm, stride_lr,
                            stride_lbr, stride_lbn, scale, seed_ptr, dropout_p, tile_n * BLOCK_N, N,
                            DROPOUT, BLOCK_R, BLOCK_N, PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    out_in = row_in[:, None] & col_in[None, :]
    if IN_PLACE:
        acc += tl.load(out_ptrs, mask=out_in, other=0.0).to(tl.float32)
    else:
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        for k0 in range(0, K, BLOCK_K):
            k_in = ks < K - k0
            a = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
            if QUANT4:
                if Q4_DX:  # rows k0.. of W, columns of this tile
                    b = dequant4_tile(b_ptr, q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset,
                                      k0 + ks.to(tl.int64), k_in, tile_n * BLOCK_N, N, False,
                                      Q4_DTYPE, BLOCK_N, Q4_BLOCKSIZE, Q4_BLOCKSIZE2, Q4_ALIGNED)
                else:
                    b = dequant4_tile(b_ptr, q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset,
                                      cols, col_in, k0, K, True, Q4_DTYPE, BLOCK_K, Q4_BLOCKSIZE,
                                      Q4_BLOCKSIZE2, Q4_ALIGNED)
            else:
                b = tl.load(b_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
                b_ptrs += BLOCK_K * stride_bk
            if SCALE_IN:
                g_in = tl.load(g_ptr + k0 + ks, mask=k_in, other=0.0)
                a = (a.to(tl.float32) * g_in[None, :]).to(b.dtype)
            else:
                a = a.to(b.dtype)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
    if SCALE_OUT:
        acc *= tl.load(g_ptr + cols, mask=col_in, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_in)


_KEY = ["M_BUCKET", "N", "K", "R", "HAS_LORA", "DROPOUT", "QUANT4", "Q4_DX"]
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
    ["M_BUCKET", "N", "R", "HAS_LORA", "DROPOUT", "SCALE_OUT"], restore=["out_ptr"])


@dataclass
class LowRank:
    """The epilogue term ``scale * keep * (l @ lb)``: l ``[M, r]`` fp32, lb ``[r, N]``.

    ``dropout_p > 0`` masks it with the keep-mask of ``seed`` (int64 ``[1]`` on the device)
    for an ``[M, N]`` input.
    """
    l: torch.Tensor
    lb: torch.Tensor
    scale: float
    dropout_p: float = 0.0
    seed: torch.Tensor | None = None


def b_shape(b: torch.Tensor | Quant4Args) -> tuple[int, int]:
    """The ``[K, N]`` shape of a GEMM's b operand, dense or 4-bit."""
    return b.b_shape if isinstance(b, Quant4Args) else (b.shape[0], b.shape[1])


def _launch(a: torch.Tensor, b: torch.Tensor | Quant4Args, low: LowRank | None,
            bias: torch.Tensor | None, out: torch.Tensor, g_out: torch.Tensor | None,
            g_in: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    if g_out is not None and g_in is not None:
        raise ValueError("the fused linear takes g_out or g_in, not both")
    m, k = a.shape
    n = b_shape(b)[1]
    if m == 0 or n == 0:
        return out
    has_lora = low is not None
    if low is None:  # placeholders: HAS_LORA=False never reads them
        low = LowRank(l=a, lb=a, scale=0.0)
    r = low.l.shape[1] if has_lora else 0
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    g = g_out if g_out is not None else g_in
    dropout = has_lora and low.dropout_p > 0.0
    lb_dtype = low.lb.dtype if has_lora else None
    if isinstance(b, Quant4Args):  # b's strides are unused; the quant parts follow the seed
        b_ptr, b_strides, quant = b.data, (0, 0), b.pointers()[1:]
        flags = b.gemm_constexprs()
        kernel = Q4_KERNELS[kind(b.dtype, lb_dtype, dropout), flags["Q4_ALIGNED"]]
    else:
        b_ptr, b_strides, quant, flags = b, b.stride(), (out,) * 5, DENSE_CONSTEXPRS
        kernel = IN_PLACE_KERNEL if in_place else KERNELS[kind(a.dtype, lb_dtype, dropout)]
    kernel[grid](
        a, b_ptr, low.l, low.lb, bias if bias is not None else out, g if g is not None else out,
        out, m, n, k, r, m_bucket(m),
        a.stride(0), a.stride(1), *b_strides, low.l.stride(0), low.l.stride(1),
        low.lb.stride(0), low.lb.stride(1), out.stride(0), out.stride(1),
        low.scale, low.seed if low.seed is not None else out, low.dropout_p, *quant,
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, DROPOUT=dropout,
        SCALE_OUT=g_out is not None, SCALE_IN=g_in is not None,
        IN_PLACE=in_place, **flags,
        BLOCK_R=rank_block(max(r, 1)), PRECISION=fp32_precision())
    return out


@on_device
def fused_linear(a: torch.Tensor, b: torch.Tensor | Quant4Args, low: LowRank | None = None,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                 g_out: torch.Tensor | None = None, g_in: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``g_out * (a @ (g_in * b) + low-rank term) + bias``: a ``[M, K]``, b ``[K, N]`` (any
    strides; or a 4-bit ``Quant4Args``, W^T or W, whose tiles are dequantized in the
    kernel: the dot runs in its compute dtype), the optional DoRA factors g_out ``[N]`` /
    g_in ``[K]`` contiguous fp32."""
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
def cublas_linear(a: torch.Tensor, b: torch.Tensor, low: LowRank | None = None,
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
