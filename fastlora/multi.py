"""Multi-adapter (gathered) batches: the ``torch.library`` custom ops with autograd behind
``fastlora.multi_lora_linear`` (in ``fastlora.functional``; adapters packed as in
``fastlora.adapters``).

Row i of x (leading dims flattened) gets ``y_i = x_i W^T + bias + s_a x_i A_a^T B_a^T``
for its adapter ``a = adapter_index[i]`` (DoRA adapters: ``g_a * (x_i W^T + s_a x_i A_a^T
B_a^T) + bias``, ``g_a = m_a / ||W + s_a B_a A_a||`` with the norm detached); ``-1`` means
the base layer only.

The Triton path (see ``fastlora.kernels.multi_meta``): rows grouped by adapter on the
device (stable argsort + searchsorted: no host sync, static grids, CUDA-graph safe), a
shrink over segment tiles, the base GEMM over all rows with each tile's adapters added
in its prologue, and a backward giving dx and every adapter's own dA, dB (and DoRA
magnitude) gradient. Per-adapter dropout probabilities and the dropout seed are device
tensors the kernels load.
"""
from __future__ import annotations

import torch


# ---------------------------------------------------------------- custom ops
# (the kernels are imported on first use, as fastlora.functional does: importing fastlora
# loads neither Triton nor the kernels)


def _groups(perm, keys, seg, n):
    from .kernels.multi_meta import RowGroups

    return RowGroups(perm, keys, seg, n)


@torch.library.custom_op("fastlora::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                   scales: torch.Tensor, g: torch.Tensor | None, dora_flags: torch.Tensor | None,
                   dropout: torch.Tensor | None, perm: torch.Tensor, keys: torch.Tensor,
                   seg: torch.Tensor, max_rank: int, seed: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``; returns y ``[M, N]`` (x's dtype) and S ``[M, max_rank]`` fp32 (sorted
    rows: the scaled shrink). g ``[n, N]`` fp32 (DoRA), dropout ``[n]`` fp32 or None."""
    from .kernels.multi_linear import MultiLowRank, multi_fused_linear
    from .kernels.multi_shrink import multi_lora_shrink

    groups = _groups(perm, keys, seg, offsets.shape[0])
    s = multi_lora_shrink(x, A, offsets, ranks, scales, max_rank, groups, dropout, seed)
    y = multi_fused_linear(x, weight.t(), MultiLowRank(s, B, offsets, ranks, groups), bias,
                           g_out=g)
    return y, s


@multi_lora_fwd.register_fake
def _(x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg,
      max_rank, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], max(max_rank, 1)), dtype=torch.float32))


@torch.library.custom_op("fastlora::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                   offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                   g: torch.Tensor | None, dora_flags: torch.Tensor | None,
                   dropout: torch.Tensor | None, perm: torch.Tensor, keys: torch.Tensor,
                   seg: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None,
                   seed: torch.Tensor | None, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx or empty, packed dA ``[S, K]``, packed dB^T ``[S, N]``, dg ``[n, N]`` fp32
    or empty); rows of adapters absent from the batch get zeros. y: the forward's output
    (DoRA only)."""
    from .kernels.backward import DoraBackward
    from .kernels.multi_backward import multi_lora_da, multi_lora_dy
    from .kernels.multi_linear import MultiLowRank, multi_fused_linear

    groups = _groups(perm, keys, seg, offsets.shape[0])
    dora = DoraBackward(g, y, bias) if g is not None else None
    out = multi_lora_dy(dy, B, s, offsets, ranks, scales, groups, dora, dora_flags)
    ds, db = out[:2]
    da = multi_lora_da(ds, x, offsets, ranks, A.shape[0], A.dtype, groups, dropout, seed)
    if need_dx:
        low = MultiLowRank(ds, A, offsets, ranks, groups, dropout, seed)
        dx = multi_fused_linear(dy, weight, low, out_dtype=x.dtype, g_in=g)
    else:
        dx = x.new_empty((0,))
    dg = out[2] / g if g is not None else x.new_empty((0,), dtype=torch.float32)
    return dx, da.to(A.dtype), db.to(B.dtype), dg


@multi_lora_bwd.register_fake
def _(dy, x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys,
      seg, s, y, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dg = torch.empty_like(g) if g is not None else x.new_empty((0,), dtype=torch.float32)
    return dx, torch.empty_like(A), torch.empty_like(B), dg


def _setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg,
     _, seed) = inputs
    ctx.save_for_backward(x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout,
                          perm, keys, seg, output[1], output[0] if g is not None else None, seed)


def _backward(ctx, dy, _ds):
    (x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg, s,
     y, seed) = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    need_g = ctx.needs_input_grad[8]
    dx = da = db = dg = dweight = dbias = None
    if need_x or need_a or need_bb or need_g:
        dx, da, db, dg = multi_lora_bwd(dy, x, weight, bias, A, B, offsets, ranks, scales, g,
                                        dora_flags, dropout, perm, keys, seg, s, y, seed, need_x)
    if need_w:  # a trainable base weight is unusual: plain PyTorch, no fusion
        dyw = dy.float()
        if g is not None:  # DoRA rows: the gradient of g_a * x W^T
            g_rows = torch.cat([g, g.new_ones((1, g.shape[1]))])
            dyw = dyw * g_rows[torch.empty_like(keys).scatter_(0, perm, keys).long()]
        dweight = (dyw.t() @ x.float()).to(weight.dtype)
    if need_b:
        dbias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, None, None, (dg if need_g else None),
            None, None, None, None, None, None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)
