"""The fused linear for Hopper (sm_90): a persistent kernel on TMA tensor descriptors.

Same result as ``linear.fused_linear``: ``out = g_out * (a @ (g_in * b) + scale * keep *
(l @ lb)) + bias``, built on Triton tutorial 09's recipe instead of tutorial 03's: one
program per SM walks the output tiles (grouped order, for L2 reuse), a and b arrive through
TMA descriptor loads (zero-filled past the edges: no masks in the K loop), and the tile is
stored through a descriptor in two column halves (epilogue subtiling: a converted half
tile needs half the registers, and the first half's asynchronous store can run during the
second half's epilogue). As in the pointer kernel, the low-rank term is the accumulator's
starting value (pointer loads: l and lb are small and their strides need not suit TMA), so
one accumulator is live, and fp32 dots run at ``fp32_precision()`` (tf32x3 at torch's
default "highest" matmul precision) with the pointer kernel's kinds of configs.

Descriptors are built on the host with ``triton.tools.tensor_descriptor.TensorDescriptor``
and a per-config pre-hook sets their block shapes. Verified in the released sources of
Triton 3.6.0 (the wheel's ``triton/tools/tensor_descriptor.py``: the dataclass with
``from_tensor(tensor, block_shape)``, a mutable ``block_shape`` and zero padding) and
3.9.0; both compile this kernel for sm_90 to ``wgmma`` with TMA loads. Host descriptors
need no ``triton.set_allocator`` (device-side ``tl.make_tensor_descriptor`` does: a
process-wide setting a library should not take over) and are plain kernel parameters,
so a captured CUDA graph replays them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (fp32_precision, gemm_configs, grouped_tile, interpreting, low_rank_tile,
                     m_bucket, on_device, sm_count, tune)
from .descriptors import Term
from .linear import kind

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton without host-side tensor descriptors
    TensorDescriptor = None


def _set_block_shapes(nargs):
    """Descriptor block shapes for the config about to run (tutorial 09's pre-hook)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]
    nargs["out_desc"].block_shape = [bm, bn // 2]


def _configs(shapes):
    chosen = gemm_configs(shapes)
    for config in chosen:
        config.pre_hook = _set_block_shapes
    return chosen


# By ``linear.kind`` of launch, as the pointer kernel's. "heavy": the dropout mask (dx),
# the g_in scaling (DoRA dx: a goes through registers) or an fp32 low-rank term (tf32x3
# splits) need registers next to the accumulator: at most 64 fp32 accumulator values per
# thread, and 64 x 256 tiles spill even so (check-kernels). "fp32": fp32 a and b at
# tf32x3, short K steps.
_CONFIGS = {"light": _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                               (64, 128, 64, 4, 4), (64, 256, 64, 4, 3)]),
            "heavy": _configs([(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]),
            "fp32": _configs([(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3)])}
_KEY = ["M_BUCKET", "N", "K", "R", "HAS_LORA", "DROPOUT", "SCALE_IN", "B_NK"]


@triton.jit
def _store_half(out_desc, acc, row0, col0, bias, g, N, SCALE_OUT: tl.constexpr,
                HALF: tl.constexpr):
    """g, bias (None: none) and the store of one ``[BLOCK_M, HALF]`` half tile at (row0,
    col0)."""
    cols = col0 + tl.arange(0, HALF)
    col_in = cols < N
    if SCALE_OUT:
        acc *= tl.load(g + cols, mask=col_in, other=0.0)[None, :]
    if bias is not None:
        acc += tl.load(bias + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    out_desc.store([row0, col0], acc.to(out_desc.dtype))


@triton.jit
def _lora_linear_tma_kernel(a_desc, b_desc, out_desc, M, N, K, R, M_BUCKET, low, bias, g,
                            HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr,
                            SCALE_OUT: tl.constexpr, SCALE_IN: tl.constexpr, B_NK: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Descriptors of a ``[M, K]``, b (``[N, K]`` with B_NK, else ``[K, N]``) and out
    ``[M, N]``, all one dtype; low (a ``descriptors.Term``, HAS_LORA; else None), bias and g
    as in ``_lora_linear_kernel`` (None when absent).

    Grid: at most one program per SM; program i takes tiles i, i + programs, ...
    """
    HALF: tl.constexpr = BLOCK_N // 2
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        tile_m, tile_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        row0 = tile_m * BLOCK_M
        col0 = tile_n * BLOCK_N
        if HAS_LORA:
            rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
            cols = col0.to(tl.int64) + tl.arange(0, BLOCK_N)
            acc = low_rank_tile(low.l.ptr, low.lb.ptr, rows, cols, rows < M, cols < N, R,
                                low.l.stride0, low.l.stride1, low.lb.stride0, low.lb.stride1,
                                low.scale, low.seed, low.dropout_p, col0, N, DROPOUT,
                                low.BLOCK_R, BLOCK_N, PRECISION)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            if SCALE_IN:
                ks = k0 + tl.arange(0, BLOCK_K)
                g_in = tl.load(g + ks, mask=ks < K, other=0.0)
                a = (a.to(tl.float32) * g_in[None, :]).to(a.dtype)
            if B_NK:
                b = b_desc.load([col0, k0]).T
            else:
                b = b_desc.load([k0, col0])
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        _store_half(out_desc, left, row0, col0, bias, g, N, SCALE_OUT, HALF)
        _store_half(out_desc, right, row0, col0 + HALF, bias, g, N, SCALE_OUT, HALF)


KERNELS = {k: tune(_lora_linear_tma_kernel, c, _KEY) for k, c in _CONFIGS.items()}


def _tma_ready(name: str, t: torch.Tensor) -> str | None:
    """Why a 2-D tensor cannot back a TMA descriptor over its row-major layout, or None."""
    size = t.element_size()
    if t.stride(1) != 1:
        return f"{name} is not contiguous along its last dimension (strides {tuple(t.stride())})"
    if (t.stride(0) * size) % 16 or t.data_ptr() % 16:
        return (f"{name} rows are not 16-byte aligned (row stride {t.stride(0)} x {size} "
                "bytes; TMA needs multiples of 16)")
    return None


def tma_unsupported(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None
                    ) -> str | None:
    """Why ``tma_linear`` cannot run ``a @ b`` (a ``[M, K]``, b ``[K, N]``), or None."""
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no triton.tools.tensor_descriptor"
    if a.is_cuda:
        major, minor = torch.cuda.get_device_capability(a.device)
        if major != 9:
            name = torch.cuda.get_device_name(a.device)
            return f"the TMA kernel is built for sm_90 (Hopper); {name} is sm_{major}{minor}"
    elif not interpreting():
        return f"needs a CUDA tensor (got {a.device}) or TRITON_INTERPRET=1"
    if a.dtype != b.dtype or (out_dtype is not None and out_dtype != a.dtype):
        return f"a ({a.dtype}), b ({b.dtype}) and the output ({out_dtype}) must share a dtype"
    if a.shape[1] == 0:
        return "empty reduction (K = 0)"
    if (b.shape[1] * a.element_size()) % 16:
        return f"output rows of {b.shape[1]} x {a.element_size()} bytes are not 16-byte aligned"
    return tma_layout_unsupported(a, b)


def tma_layout_unsupported(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the layouts of a ``[M, K]`` and b ``[K, N]`` (b as W^T of a row-major W, or
    row-major itself) cannot back TMA descriptors (rows contiguous, starting on 16-byte
    boundaries), or None."""
    return _tma_ready("a", a) or _tma_ready("b", b.t() if b.stride(0) == 1 else b)


@on_device
def tma_linear(a: torch.Tensor, b: torch.Tensor, low: Term | None = None,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
               g_out: torch.Tensor | None = None, g_in: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``fused_linear``'s result from the persistent TMA kernel (arguments alike); raises
    ValueError with ``tma_unsupported``'s reason when the operands do not suit it."""
    reason = tma_unsupported(a, b, out_dtype)
    if reason:
        raise ValueError(f"tma_linear: {reason}")
    if g_out is not None and g_in is not None:
        raise ValueError("tma_linear takes g_out or g_in, not both")
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    b_nk = b.stride(0) == 1  # b = W^T of a row-major W [N, K]: describe W itself
    # placeholder block shapes; _set_block_shapes sets the config's before each launch
    a_desc = TensorDescriptor.from_tensor(a, [16, 16])
    b_desc = TensorDescriptor.from_tensor(b.t() if b_nk else b, [16, 16])
    out_desc = TensorDescriptor.from_tensor(out, [16, 16])
    g = g_out if g_out is not None else g_in
    sms = sm_count(a.device)

    def grid(meta):
        return (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    dropout = low is not None and low.seed is not None
    lb_dtype = low.lb.ptr.dtype if low is not None else None
    KERNELS[kind(a.dtype, lb_dtype, dropout or g_in is not None)][grid](
        a_desc=a_desc, b_desc=b_desc, out_desc=out_desc, low=low, bias=bias, g=g, M=m, N=n, K=k,
        R=low.l.ptr.shape[1] if low is not None else 0, M_BUCKET=m_bucket(m),
        HAS_LORA=low is not None, DROPOUT=dropout, SCALE_OUT=g_out is not None, SCALE_IN=g_in is not None, B_NK=b_nk,
        PRECISION=fp32_precision())
    return out
