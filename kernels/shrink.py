"""Shrink: ``T = drop(x) @ A^T`` (fp32 ``[M, r]``), dropout drawn in-kernel, mask never stored."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (configs, fp32_precision, m_bucket, on_device, rank_block, shrink_tile,
                     tune)


def _configs(shapes):
    return configs(("BLOCK_M", "BLOCK_K"), shapes, dict(BLOCK_M=32, BLOCK_K=32))


# keyed by "A is fp32": the tf32x3 splits of x and A need smaller tiles (check-kernels)
_CONFIGS = {False: _configs([(16, 256, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3)]),
            True: _configs([(16, 64, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)])}


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, t_ptr, M, K, R, M_BUCKET,
                        stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
                        seed_ptr, dropout_p, keep_scale,
                        DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x ``[M, K]`` (any float), A ``[R, K]`` (adapter dtype), T ``[M, R]`` fp32.

    Grid: (row tiles, rank tiles). The dot runs in A's dtype, as PEFT casts x to it.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < M
    rank_in = ranks < R
    acc = shrink_tile(x_ptr, rows, row_in, stride_xm, stride_xk, a_ptr, ranks.to(tl.int64),
                      rank_in, stride_ar, stride_ak, K, seed_ptr, dropout_p, DROPOUT, PRECISION,
                      BLOCK_K)
    if DROPOUT:
        acc *= keep_scale
    tl.store(t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr, acc,
             mask=row_in[:, None] & rank_in[None, :])


KERNELS = {fp32: tune(_lora_shrink_kernel, c, ["M_BUCKET", "K", "R", "DROPOUT"])
           for fp32, c in _CONFIGS.items()}


@on_device
def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float = 0.0,
                seed: torch.Tensor | None = None) -> torch.Tensor:
    """``drop(x) @ lora_A.T`` as fp32 ``[M, r]``; x ``[M, K]``, lora_A ``[r, K]``; seed int64
    ``[1]`` on x's device when ``dropout_p > 0``."""
    m, k = x.shape
    r = lora_A.shape[0]
    t = torch.empty((m, r), dtype=torch.float32, device=x.device)
    if m == 0:
        return t
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))  # noqa: E731
    KERNELS[lora_A.dtype == torch.float32][grid](
        x, lora_A, t, m, k, r, m_bucket(m),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), t.stride(0), t.stride(1),
        seed if seed is not None else t, dropout_p, 1.0 / (1.0 - dropout_p),
        DROPOUT=dropout_p > 0.0, BLOCK_R=block_r, PRECISION=fp32_precision())
    return t
