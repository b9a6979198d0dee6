"""LoRA backward pieces that the fused linear kernel does not cover.

* ``_lora_dy_kernel``: one pass over dY gives ``dS = s dY B`` ``[M, r]`` and
  ``dB = s dY^T T`` ``[N, r]``;
* ``_lora_da_kernel``: ``dA = dS^T drop(x)`` ``[r, K]``, the dropout mask regenerated.

Both reduce across programs with fp32 atomics into buffers a config pre-hook zeroes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (configs, dropout_keep, fp32_precision, m_bucket, on_device, rank_block,
                     sm_count, tune)


def _dy_configs(shapes):
    return configs(("BLOCK_M", "BLOCK_N"), shapes, dict(BLOCK_M=32, BLOCK_N=32),
                   zero=("ds_ptr", "db_ptr", "dg_ptr"))


# keyed by "B is fp32": tf32x3 splits a [BLOCK_M, BLOCK_N] tile of dY, so narrow tiles
_DY_CONFIGS = {
    False: _dy_configs([(16, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3)]),
    True: _dy_configs([(32, 32, 4, 3), (64, 32, 4, 3)]),
}


@triton.jit
def _lora_dy_kernel(dy_ptr, b_ptr, t_ptr, ds_ptr, db_ptr, g_ptr, y_ptr, bias_ptr, dg_ptr,
                    M, N, R, M_BUCKET, stride_dym, stride_dyn, stride_bn, stride_br,
                    stride_tm, stride_tr, stride_ym, stride_yn, scale,
                    DORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dY ``[M, N]``, B ``[N, R]`` (adapter dtype: the dots run in it), T ``[M, R]`` fp32;
    dS ``[M, R]`` and dB ``[N, R]`` are contiguous fp32 accumulators.

    DORA: the LoRA gradients are those of ``g * dY`` (g ``[N]`` fp32), and the same pass
    over dY accumulates ``dg * g = colsum(dY * (Y - bias))`` into dg ``[N]`` fp32 from the
    saved output Y ``[M, N]``.

    Grid: (row tiles, column splits, rank tiles); split j visits column tiles j, j + splits...
    """
    splits = tl.num_programs(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < M
    rank_in = ranks < R
    t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
                mask=row_in[:, None] & rank_in[None, :], other=0.0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, N, splits * BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_in = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_in[:, None] & col_in[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=col_in[:, None] & rank_in[None, :], other=0.0)
        if DORA:
            y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                        mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                y -= tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
            if tl.program_id(2) == 0:
                tl.atomic_add(dg_ptr + cols, tl.sum(dy.to(tl.float32) * y, axis=0), mask=col_in)
            dy = dy.to(tl.float32) * tl.load(g_ptr + cols, mask=col_in, other=0.0)[None, :]
        dy = dy.to(b.dtype)
        ds = tl.dot(dy, b, ds, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), t.to(b.dtype), input_precision=PRECISION)
        tl.atomic_add(db_ptr + cols[:, None] * R + ranks[None, :], db * scale,
                      mask=col_in[:, None] & rank_in[None, :])
    tl.atomic_add(ds_ptr + rows[:, None] * R + ranks[None, :], ds * scale,
                  mask=row_in[:, None] & rank_in[None, :])


DY_KERNELS = {fp32: tune(_lora_dy_kernel, c, ["M_BUCKET", "N", "R", "DORA"])
              for fp32, c in _DY_CONFIGS.items()}


def _da_configs(shapes):
    return configs(("BLOCK_M", "BLOCK_K"), shapes, dict(BLOCK_M=32, BLOCK_K=32), zero=("da_ptr",))


# keyed by "the dot runs in fp32"
_DA_CONFIGS = {
    False: _da_configs([(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)]),
    True: _da_configs([(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3)]),
}


@triton.jit
def _lora_da_kernel(ds_ptr, x_ptr, da_ptr, M, K, R, M_BUCKET,
                    stride_dsm, stride_dsr, stride_xm, stride_xk,
                    seed_ptr, dropout_p, keep_scale,
                    DOT_DTYPE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dS ``[M, R]`` fp32, x ``[M, K]``; dA ``[R, K]`` a contiguous fp32 accumulator.

    The dot runs in DOT_DTYPE, the adapter's dtype (PEFT casts x to it).
    Grid: (column tiles, row splits, rank tiles); split j visits row tiles j, j + splits...
    """
    splits = tl.num_programs(1)
    col0 = tl.program_id(0) * BLOCK_K
    cols = col0.to(tl.int64) + tl.arange(0, BLOCK_K)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_in = cols < K
    rank_in = ranks < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for m0 in range(tl.program_id(1) * BLOCK_M, M, splits * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_in = rows < M
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_in[:, None] & col_in[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(dropout_keep(seed, rows, col0, K, dropout_p, BLOCK_K), x, 0.0)
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
                     mask=row_in[:, None] & rank_in[None, :], other=0.0)
        acc = tl.dot(tl.trans(ds).to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if DROPOUT:
        acc *= keep_scale
    tl.atomic_add(da_ptr + ranks[:, None] * K + cols[None, :], acc,
                  mask=rank_in[:, None] & col_in[None, :])


DA_KERNELS = {fp32: tune(_lora_da_kernel, c, ["M_BUCKET", "K", "R", "DROPOUT"], prune=False)
              for fp32, c in _DA_CONFIGS.items()}


@dataclass
class DoraBackward:
    """What the DoRA backward reads besides dY: g ``[N]`` fp32, the output Y ``[M, N]``
    and the bias ``[N]`` (or None)."""
    g: torch.Tensor
    y: torch.Tensor
    bias: torch.Tensor | None


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _splits(tiles: int, other_tiles: int, device: torch.device) -> int:
    """How many programs share a reduction: enough for about two waves of the GPU."""
    return max(1, min(tiles, triton.cdiv(2 * sm_count(device), max(other_tiles, 1))))


@on_device
def lora_dy(dy: torch.Tensor, lora_B: torch.Tensor, t: torch.Tensor, scaling: float,
            dora: DoraBackward | None = None) -> tuple[torch.Tensor, ...]:
    """``(dS, dB) = (s dY' B, s dY'^T T)`` as fp32, dY' = dY (or ``g * dY`` with DoRA, which
    also returns ``colsum(dY * (Y - bias))`` ``[N]``): dy ``[M, N]``, lora_B ``[N, r]``,
    t ``[M, r]``."""
    m, n = dy.shape
    r = lora_B.shape[1]
    ds = torch.empty((m, r), dtype=torch.float32, device=dy.device)
    db = torch.empty((n, r), dtype=torch.float32, device=dy.device)
    dg = torch.empty((n if dora is not None else 1,), dtype=torch.float32, device=dy.device)
    if m == 0:
        return (ds, db.zero_()) + ((dg.zero_(),) if dora is not None else ())
    block_r = rank_block(r)
    rank_tiles = triton.cdiv(r, block_r)

    def grid(meta):
        row_tiles = triton.cdiv(m, meta["BLOCK_M"])
        splits = _splits(triton.cdiv(n, meta["BLOCK_N"]), row_tiles * rank_tiles, dy.device)
        return (row_tiles, splits, rank_tiles)

    g, y, bias = (dora.g, dora.y, dora.bias) if dora is not None else (dg, dy, None)
    DY_KERNELS[lora_B.dtype == torch.float32][grid](
        dy, lora_B, t, ds, db, g, y, bias if bias is not None else dg, dg, m, n, r, m_bucket(m),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), t.stride(0), t.stride(1),
        y.stride(0), y.stride(1), scaling,
        DORA=dora is not None, HAS_BIAS=bias is not None, BLOCK_R=block_r,
        PRECISION=fp32_precision())
    return (ds, db) + ((dg,) if dora is not None else ())


@on_device
def lora_da(ds: torch.Tensor, x: torch.Tensor, adapter_dtype: torch.dtype,
            dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """``dS^T drop(x)`` as fp32 ``[r, K]``: ds ``[M, r]`` fp32, x ``[M, K]``, seed int64 ``[1]``
    (dropout only)."""
    m, k = x.shape
    r = ds.shape[1]
    da = torch.empty((r, k), dtype=torch.float32, device=x.device)
    if m == 0:
        return da.zero_()
    block_r = rank_block(r)
    rank_tiles = triton.cdiv(r, block_r)

    def grid(meta):
        col_tiles = triton.cdiv(k, meta["BLOCK_K"])
        splits = _splits(triton.cdiv(m, meta["BLOCK_M"]), col_tiles * rank_tiles, x.device)
        return (col_tiles, splits, rank_tiles)

    DA_KERNELS[adapter_dtype == torch.float32][grid](
        ds, x, da, m, k, r, m_bucket(m), ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
        seed if seed is not None else da, dropout_p, 1.0 / (1.0 - dropout_p),
        DOT_DTYPE=_TL_DTYPES[adapter_dtype], DROPOUT=dropout_p > 0.0, BLOCK_R=block_r,
        PRECISION=fp32_precision())
    return da
