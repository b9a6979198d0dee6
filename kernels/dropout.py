"""The dropout keep-mask the LoRA kernels generate, materialized for tests only."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dropout_keep, on_device


@triton.jit
def _dropout_mask_kernel(out_ptr, seed_ptr, M, K, p, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_K, K, p, BLOCK_K)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=inside)


@on_device
def _launch(seed: torch.Tensor, m: int, k: int, p: float) -> torch.Tensor:
    out = torch.empty((m, k), dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(k, 32))
    _dropout_mask_kernel[grid](out, seed, m, k, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def dropout_mask(seed: int | torch.Tensor, m: int, k: int, p: float, device="cpu") -> torch.Tensor:
    """Bool keep-mask ``[m, k]`` exactly as the kernels draw it for an input ``[m, k]``;
    ``seed`` an int or the int64 ``[1]`` seed tensor the ops pass (its device is used)."""
    if not isinstance(seed, torch.Tensor):
        seed = torch.full((1,), int(seed), dtype=torch.int64, device=device)
    return _launch(seed, m, k, p)
