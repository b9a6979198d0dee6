"""Fused linear: ``out = g_out * (a @ (g_in * b) + scale * keep * (l @ lb)) + bias``, one pass.

One kernel family for the forward (``y = x W^T + s T B^T + bias``) and the input gradient
(``dx = dy W + keep * (dS A) / (1 - p)``): the low-rank term and the bias are added to the
tile's accumulator before the single store of the output, so no ``M x N`` LoRA temporary
exists. DoRA adds the column factor ``g``: on the output columns in the forward
(``g_out``), on dY's columns (the reduction dimension, ``g_in``) in the dx pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (FP32_GEMM_SHAPES, dropout_keep, fp32_precision, gemm_configs, grouped_tile,
                     m_bucket, on_device, rank_block, tune)


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
                        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                        SCALE_OUT: tl.constexpr, SCALE_IN: tl.constexpr,
                        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """a ``[M, K]`` and b ``[K, N]`` (same 16/32-bit float dtype), l ``[M, R]`` fp32,
    lb ``[R, N]`` (adapter dtype; the low-rank dot runs in it), bias ``[N]``, out ``[M, N]``.

    Accumulates in fp32; with DROPOUT the low-rank term is masked by the keep-mask of an
    ``[M, N]`` input (the dx pass, where N is the layer's K). g ``[N]`` (SCALE_OUT) or
    ``[K]`` (SCALE_IN) is fp32.
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N),
                                  GROUP_M)
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    # The low-rank term goes in first, so that a single [BLOCK_M, BLOCK_N] accumulator is
    # live at a time (an epilogue would hold a second one next to the GEMM's: spills).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_in = ranks < R
            lt = tl.load(l_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr,
                         mask=row_in[:, None] & rank_in[None, :], other=0.0)
            lb = tl.load(lb_ptr + ranks[:, None] * stride_lbr + cols[None, :] * stride_lbn,
                         mask=rank_in[:, None] & col_in[None, :], other=0.0)
            acc = tl.dot(lt.to(lb.dtype), lb, acc, input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep(tl.load(seed_ptr), rows, tile_n * BLOCK_N, N, dropout_p, BLOCK_N)
            acc = tl.where(keep, acc, 0.0)
        acc *= scale
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_in = ks < K - k0
        a = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
        if SCALE_IN:
            g_in = tl.load(g_ptr + k0 + ks, mask=k_in, other=0.0)
            a = (a.to(tl.float32) * g_in[None, :]).to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SCALE_OUT:
        acc *= tl.load(g_ptr + cols, mask=col_in, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


KERNELS = {k: tune(_lora_linear_kernel, c, ["M_BUCKET", "N", "K", "R", "HAS_LORA", "DROPOUT"])
           for k, c in _CONFIGS.items()}


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


@on_device
def fused_linear(a: torch.Tensor, b: torch.Tensor, low: LowRank | None = None,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                 g_out: torch.Tensor | None = None, g_in: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``g_out * (a @ (g_in * b) + low-rank term) + bias``: a ``[M, K]``, b ``[K, N]`` (any
    strides), the optional DoRA factors g_out ``[N]`` / g_in ``[K]`` contiguous fp32."""
    if g_out is not None and g_in is not None:
        raise ValueError("fused_linear takes g_out or g_in, not both")
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=out_dtype or a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    has_lora = low is not None
    if low is None:  # placeholders: HAS_LORA=False never reads them
        low = LowRank(l=a, lb=b, scale=0.0)
    r = low.l.shape[1] if has_lora else 0
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    g = g_out if g_out is not None else g_in
    dropout = has_lora and low.dropout_p > 0.0
    KERNELS[kind(a.dtype, low.lb.dtype if has_lora else None, dropout)][grid](
        a, b, low.l, low.lb, bias if bias is not None else out, g if g is not None else out, out,
        m, n, k, r, m_bucket(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), low.l.stride(0), low.l.stride(1),
        low.lb.stride(0), low.lb.stride(1), out.stride(0), out.stride(1),
        low.scale, low.seed if low.seed is not None else out, low.dropout_p,
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, DROPOUT=dropout,
        SCALE_OUT=g_out is not None, SCALE_IN=g_in is not None,
        BLOCK_R=rank_block(max(r, 1)), PRECISION=fp32_precision())
    return out
