"""The dropout keep-mask the LoRA kernels generate, materialized for tests only."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dropout_keep


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows, tl.program_id(1) * BLOCK_K, K, p, BLOCK_K)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=inside)


def dropout_mask(seed: int, m: int, k: int, p: float, device="cpu") -> torch.Tensor:
    """Bool keep-mask ``[m, k]`` exactly as the kernels draw it for an input ``[m, k]``."""
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    grid = (triton.cdiv(m, 32), triton.cdiv(k, 32))
    _dropout_mask_kernel[grid](out, m, k, seed, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
