"""DoRA's row norm ``||W + s B A||`` per output row, without forming ``B A`` (``N x K``).

``||W + sBA||^2 = ||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)``: one
pass over W gives ``||W||^2`` and ``W A^T`` (``[N, r]``, on tensor cores); the rest is
``N x r`` and ``r x r`` work. A 4-bit W (``QUANT4``) is dequantized tile by tile in
registers, in fp32: its squares are summed exactly, the dot with A runs in A's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import configs, fp32_precision, on_device, rank_block, tune
from .descriptors import Quant4, mat
from .quant4 import dequant4_tile


def _configs(shapes):
    return configs(("BLOCK_N", "BLOCK_K"), shapes, dict(BLOCK_N=32, BLOCK_K=32))


# keyed by "A is fp32" (tf32x3 splits of the W and A tiles)
_CONFIGS = {False: _configs([(32, 256, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3)]),
            True: _configs([(64, 64, 4, 3), (64, 128, 8, 3), (128, 32, 4, 3), (128, 64, 8, 3)])}
# 4-bit W, by (A is fp32, K a multiple of the blocksize): rows of codes at most 256 wide
_Q4_CONFIGS = {(False, True): _configs([(32, 256, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4)]),
               (True, True): _configs([(64, 64, 4, 3), (64, 128, 8, 3), (128, 32, 4, 3)]),
               (False, False): _configs([(32, 128, 4, 3), (64, 64, 4, 3)]),
               (True, False): _configs([(32, 64, 4, 3), (64, 32, 4, 3)])}


@triton.jit
def _dora_norm_kernel(w, a, wa_ptr, sq_ptr, N, K, R, QUANT4: tl.constexpr,
                      BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W ``[N, K]`` (``Mat``, any float; QUANT4: a 4-bit W, ``descriptors.Quant4``), A ``[R,
    K]`` (``Mat``, adapter dtype: the dot runs in it); writes ``W A^T`` to wa ``[N, R]`` and
    ``rowsum(W^2)`` to sq ``[N]``, both contiguous fp32.

    Grid: (row tiles, rank tiles); rank tile 0 also sums the squares.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < N
    rank_in = ranks < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_in = cols < K
        if QUANT4:
            w_tile = dequant4_tile(w.data, w.absmax, w.code, w.absmax2, w.code2, w.offset, rows,
                                   row_in, k0, K, False, tl.float32, BLOCK_K, w.BLOCKSIZE,
                                   w.BLOCKSIZE2, w.ALIGNED)
        else:
            w_tile = tl.load(w.ptr + rows[:, None] * w.stride0 + cols[None, :] * w.stride1,
                             mask=row_in[:, None] & col_in[None, :], other=0.0)
        a_tile = tl.load(a.ptr + ranks[None, :] * a.stride0 + cols[:, None] * a.stride1,
                         mask=col_in[:, None] & rank_in[None, :], other=0.0)
        acc = tl.dot(w_tile.to(a_tile.dtype), a_tile, acc, input_precision=PRECISION)
        wf = w_tile.to(tl.float32)
        sq += tl.sum(wf * wf, axis=1)
    tl.store(wa_ptr + rows[:, None] * R + ranks[None, :], acc,
             mask=row_in[:, None] & rank_in[None, :])
    if tl.program_id(1) == 0:
        tl.store(sq_ptr + rows, sq, mask=row_in)


_KEY = ["N", "K", "R", "QUANT4"]
KERNELS = {fp32: tune(_dora_norm_kernel, c, _KEY, prune=False) for fp32, c in _CONFIGS.items()}
Q4_KERNELS = {key: tune(_dora_norm_kernel, c, _KEY, prune=False) for key, c in _Q4_CONFIGS.items()}


@on_device
def dora_norm(weight: torch.Tensor | Quant4, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per row, fp32 ``[N]``; weight ``[N, K]``
    (any strides, e.g. a transposed Conv1D weight; or a 4-bit ``Quant4``), lora_A
    ``[r, K]``, lora_B ``[N, r]``."""
    r = lora_A.shape[0]
    fp32 = lora_A.dtype == torch.float32
    quant4 = isinstance(weight, Quant4)
    n, k = weight.shape
    kernel = Q4_KERNELS[fp32, weight.ALIGNED.value] if quant4 else KERNELS[fp32]
    wa = torch.empty((n, r), dtype=torch.float32, device=lora_A.device)
    sq = torch.empty((n,), dtype=torch.float32, device=lora_A.device)
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(r, block_r))  # noqa: E731
    kernel[grid](weight if quant4 else mat(weight), mat(lora_A), wa, sq, n, k, r, QUANT4=quant4,
                 BLOCK_R=block_r, PRECISION=fp32_precision())
    a = lora_A.float()
    b = lora_B.float()
    cross = (b * wa).sum(1)
    quad = ((b @ (a @ a.t())) * b).sum(1)
    return (sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0.0).sqrt()
