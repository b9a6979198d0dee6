"""The 4-bit dequantization the QUANT4 kernels do in registers, run on its own for the tests
and the AOT check: ``dequantize4`` (W materialized tile by tile) and ``q4_matmul`` (a GEMM
reading the packed weight as the forward or as the dx pass does). ``q4_matmul`` stands in for
the fused linear kernel's QUANT4 path until that lands (the same GEMM without the LoRA term)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import configs, fp32_precision, m_bucket, on_device, tune
from .quant4 import Quant4Args, dequant4_tile


@triton.jit
def _dequant4_kernel(out_ptr, q4_data, q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset,
                     N, K, TRANSPOSE: tl.constexpr, Q4_BLOCKSIZE: tl.constexpr,
                     Q4_BLOCKSIZE2: tl.constexpr, Q4_ALIGNED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out ``[N, K]`` = W, one ``[BLOCK_N, BLOCK_K]`` block per program, dequantized as the
    dx pass reads W or, with TRANSPOSE, as the forward reads ``W^T``."""
    ns = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    n_in = ns < N
    w = dequant4_tile(q4_data, q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset, ns, n_in,
                      k0, K, TRANSPOSE, out_ptr.dtype.element_ty, BLOCK_K, Q4_BLOCKSIZE,
                      Q4_BLOCKSIZE2, Q4_ALIGNED)
    if TRANSPOSE:
        w = tl.trans(w)
    tl.store(out_ptr + ns[:, None] * K + ks[None, :], w, mask=n_in[:, None] & (ks < K)[None, :])


def dequantize4(q: Quant4Args, dtype: torch.dtype = torch.float32, transpose: bool = False,
                block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """W ``[N, K]`` in ``dtype`` as the kernels dequantize it, from ``[block_n, block_k]``
    tiles (read as the forward reads ``W^T`` with ``transpose``)."""
    n, k = q.shape
    out = torch.empty((n, k), dtype=dtype, device=q.data.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant4_kernel[grid](out, *q.pointers(), n, k, TRANSPOSE=transpose, BLOCK_N=block_n,
                           BLOCK_K=block_k, **q.constexprs())
    return out


_SHAPES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_INTERP = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
_KEY = ["M_BUCKET", "N", "K", "DX"]


@triton.jit
def _q4_matmul_kernel(a_ptr, out_ptr, q4_data, q4_absmax, q4_code, q4_absmax2, q4_code2,
                      q4_offset, M, N, K, M_BUCKET, stride_am, stride_ak, stride_om, stride_on,
                      DX: tl.constexpr, Q4_BLOCKSIZE: tl.constexpr, Q4_BLOCKSIZE2: tl.constexpr,
                      Q4_ALIGNED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out [M, N] = a [M, K] @ b [K, N]`` with b = ``W^T`` (W ``[N, K]`` 4-bit, the
    forward) or, with DX, b = W (W ``[K, N]`` 4-bit, the dx pass: the reduction runs over
    W's rows). The dot runs in a's dtype; accumulates in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    row_in = rows < M
    col_in = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    for k0 in range(0, K, BLOCK_K):
        k_in = ks < K - k0
        a = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
        if DX:
            b = dequant4_tile(q4_data, q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset,
                              k0 + ks.to(tl.int64), k_in, n0, N, False, a.dtype,
                              BLOCK_N, Q4_BLOCKSIZE, Q4_BLOCKSIZE2, Q4_ALIGNED)
        else:
            b = dequant4_tile(q4_data, q4_absmax, q4_code, q4_absmax2, q4_code2, q4_offset,
                              cols, col_in, k0, K, True, a.dtype, BLOCK_K, Q4_BLOCKSIZE,
                              Q4_BLOCKSIZE2, Q4_ALIGNED)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


# blocks that straddle rows (K not a multiple of the blocksize) keep more scales per row in
# registers: smaller tiles, within the spill budget of check-kernels
Q4_MATMUL = {True: tune(_q4_matmul_kernel, configs(_SHAPES, [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                                                             (16, 64, 128, 4, 4)], _INTERP), _KEY),
             False: tune(_q4_matmul_kernel, configs(_SHAPES, [(64, 64, 64, 4, 3), (16, 64, 128, 4, 4)],
                                                    _INTERP), _KEY)}


@on_device
def q4_matmul(a: torch.Tensor, q: Quant4Args, dx: bool = False) -> torch.Tensor:
    """``a @ W^T`` (a ``[M, K]``) or, with ``dx``, ``a @ W`` (a ``[M, N]``) for the 4-bit
    W ``[N, K]``; the result has a's dtype."""
    n, k = q.shape
    m = a.shape[0]
    red, out_n = (n, k) if dx else (k, n)
    out = torch.empty((m, out_n), dtype=a.dtype, device=a.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(out_n, meta["BLOCK_N"]))  # noqa: E731
    Q4_MATMUL[q.constexprs()["Q4_ALIGNED"]][grid](a, out, *q.pointers(), m, out_n, red, m_bucket(m), a.stride(0),
                            a.stride(1), out.stride(0), out.stride(1), DX=dx,
                            PRECISION=fp32_precision(), **q.constexprs())
    return out
