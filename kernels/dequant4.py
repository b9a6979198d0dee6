"""The 4-bit dequantization the QUANT4 kernels do in registers, run on its own for the tests:
``dequantize4`` materializes W tile by tile, in the tile shapes and orientations the fused
kernels read it (the fused linear's forward reads W^T tiles, its dx pass and DoRA's norm W
tiles)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .descriptors import Quant4
from .quant4 import dequant4_tile


@triton.jit
def _dequant4_kernel(out_ptr, q, N, K, TRANSPOSE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """out ``[N, K]`` = W (q a ``descriptors.Quant4``), one ``[BLOCK_N, BLOCK_K]`` block per
    program, dequantized as the dx pass reads W or, with TRANSPOSE, as the forward reads
    ``W^T``."""
    ns = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    n_in = ns < N
    w = dequant4_tile(q.data, q.absmax, q.code, q.absmax2, q.code2, q.offset, ns, n_in, k0, K,
                      TRANSPOSE, out_ptr.dtype.element_ty, BLOCK_K, q.BLOCKSIZE, q.BLOCKSIZE2,
                      q.ALIGNED)
    if TRANSPOSE:
        w = tl.trans(w)
    tl.store(out_ptr + ns[:, None] * K + ks[None, :], w, mask=n_in[:, None] & (ks < K)[None, :])


def dequantize4(q: Quant4, dtype: torch.dtype = torch.float32, transpose: bool = False,
                block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """W ``[N, K]`` in ``dtype`` as the kernels dequantize it, from ``[block_n, block_k]``
    tiles (read as the forward reads ``W^T`` with ``transpose``)."""
    n, k = q.shape
    out = torch.empty((n, k), dtype=dtype, device=q.data.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant4_kernel[grid](out, q, n, k, TRANSPOSE=transpose, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
