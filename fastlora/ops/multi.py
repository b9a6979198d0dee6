"""Multi-adapter (gathered) batches: the ``torch.library`` custom ops with autograd behind
``fastlora.multi_lora_linear`` (in ``fastlora.functional``; adapters packed as in
``fastlora.adapters``).

Row i of x (leading dims flattened) gets ``y_i = x_i W^T + bias + s_a x_i A_a^T B_a^T``
for its adapter ``a = adapter_index[i]`` (DoRA adapters: ``g_a * (x_i W^T + s_a x_i A_a^T
B_a^T) + bias``, ``g_a = m_a / ||W + s_a B_a A_a||`` with the norm detached); ``-1`` means
the base layer only.

The Triton path (see ``fastlora.kernels.multi_meta``) takes the rows either as a per-row
index (``index``: decode batches, nothing sorted: a shrink that gathers each row's rows of
A and the fused linear that gathers each row's rows of B, two launches) or grouped by
adapter (``perm``, ``keys``, ``seg``: a shrink over segment tiles and the base GEMM over all
rows with each tile's adapters added in its prologue). DoRA's factor g is computed in the
kernels from the magnitude and the detached weight norm, so a forward launches nothing
else. The backward (rows grouped; made from the index when the forward gathered) gives dx
and every adapter's own dA, dB (and DoRA magnitude) gradient. Per-adapter dropout
probabilities and the dropout seed are device tensors the kernels load.
"""
from __future__ import annotations

import torch


# ---------------------------------------------------------------- custom ops
# (the kernels are imported on first use, as fastlora.functional does: importing fastlora
# loads neither Triton nor the kernels)


def _meta(offsets, ranks, scales, max_rank, dropout, magnitude, weight_norm, dora_flags,
          index, perm, keys, seg):
    """The kernels' launch metadata: (``AdapterMeta``, ``RowMap``)."""
    from ..kernels.multi_meta import AdapterMeta, RowGroups, RowMap

    n = offsets.shape[0]
    bank = AdapterMeta(offsets, ranks, scales, max_rank, dropout, magnitude, weight_norm,
                       dora_flags)
    rows = RowMap(n, index, RowGroups(perm, keys, seg) if perm is not None else None)
    return bank, rows


@torch.library.custom_op("fastlora::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                   scales: torch.Tensor, magnitude: torch.Tensor | None,
                   weight_norm: torch.Tensor | None, dora_flags: torch.Tensor | None,
                   dropout: torch.Tensor | None, index: torch.Tensor | None,
                   perm: torch.Tensor | None, keys: torch.Tensor | None, seg: torch.Tensor | None,
                   max_rank: int, seed: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``; rows by ``index`` ``[M]`` int32 (gathered) or by ``perm``/``keys``/``seg``
    (sorted; given with an index, only the backward reads them). Returns y ``[M, N]`` (x's dtype) and S ``[chunks, M, max_rank]`` fp32 (the
    scaled shrink, rows in batch order, as partial sums over K chunks). DoRA: magnitude
    ``[n, N]``, weight_norm ``[n, N]`` fp32 and dora_flags ``[n]`` int8; dropout ``[n]``
    fp32 or None."""
    from ..kernels.linear import MultiLowRank, multi_fused_linear
    from ..kernels.shrink import multi_lora_shrink

    bank, rows = _meta(offsets, ranks, scales, max_rank, dropout, magnitude, weight_norm,
                       dora_flags, index, perm, keys, seg)
    s = multi_lora_shrink(x, A, bank, rows, seed)
    y = multi_fused_linear(x, weight.t(), MultiLowRank(s, B, bank, rows), bias, scale_out=True)
    return y, s


@multi_lora_fwd.register_fake
def _(x, weight, bias, A, B, offsets, ranks, scales, magnitude, weight_norm, dora_flags, dropout,
      index, perm, keys, seg, max_rank, seed):
    from ..kernels.shrink import gather_splits

    chunks = gather_splits(x.shape[1])[0] if index is not None else 1
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((chunks, x.shape[0], max(max_rank, 1)), dtype=torch.float32))


@torch.library.custom_op("fastlora::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                   offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                   magnitude: torch.Tensor | None, weight_norm: torch.Tensor | None,
                   dora_flags: torch.Tensor | None, dropout: torch.Tensor | None,
                   index: torch.Tensor | None, perm: torch.Tensor | None,
                   keys: torch.Tensor | None, seg: torch.Tensor | None, s: torch.Tensor,
                   y: torch.Tensor | None, seed: torch.Tensor | None, need_dx: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx or empty, packed dA ``[S, K]``, packed dB^T ``[S, N]``, d magnitude
    ``[n, N]`` or empty); rows of adapters absent from the batch get zeros. y: the
    forward's output (DoRA only)."""
    from ..kernels.backward import multi_lora_da, multi_lora_dy
    from ..kernels.linear import MultiLowRank, multi_fused_linear

    bank, rows = _meta(offsets, ranks, scales, s.shape[2], dropout, magnitude, weight_norm,
                       dora_flags, index, perm, keys, seg)
    rows = rows.grouped()
    out = multi_lora_dy(dy, B, s.sum(0) if s.shape[0] > 1 else s[0], bank, rows, y, bias)
    ds, db = out[:2]
    da = multi_lora_da(ds, x, bank, rows, A.shape[0], A.dtype, seed)
    if need_dx:
        low = MultiLowRank(ds[None], A, bank, rows, seed)
        dx = multi_fused_linear(dy, weight, low, out_dtype=x.dtype, scale_in=True)
    else:
        dx = x.new_empty((0,))
    if magnitude is not None:  # d magnitude = dg / norm, dg = colsum(dY * (Y - bias)) / g
        dmag = torch.where(dora_flags[:, None] != 0, out[2] / magnitude.float(), 0.0)
        dmag = dmag.to(magnitude.dtype)
    else:
        dmag = x.new_empty((0,))
    return dx, da.to(A.dtype), db.to(B.dtype), dmag


@multi_lora_bwd.register_fake
def _(dy, x, weight, bias, A, B, offsets, ranks, scales, magnitude, weight_norm, dora_flags,
      dropout, index, perm, keys, seg, s, y, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dmag = torch.empty_like(magnitude) if magnitude is not None else x.new_empty((0,))
    return dx, torch.empty_like(A), torch.empty_like(B), dmag


def _row_factors(magnitude, weight_norm, dora_flags, index, perm, keys) -> torch.Tensor:
    """DoRA's g of every row's adapter, fp32 ``[M, N]`` (1 on base rows and plain adapters)."""
    n = magnitude.shape[0]
    g = torch.where(dora_flags[:, None] != 0, magnitude.float() / weight_norm, 1.0)
    g = torch.cat([g, g.new_ones((1, g.shape[1]))])
    if index is not None:
        row_key = torch.where((index < 0) | (index >= n), n, index)
    else:
        row_key = torch.empty_like(keys).scatter_(0, perm.long(), keys)
    return g[row_key.long()]


def _setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, offsets, ranks, scales, magnitude, weight_norm, dora_flags, dropout,
     index, perm, keys, seg, _, seed) = inputs
    ctx.save_for_backward(x, weight, bias, A, B, offsets, ranks, scales, magnitude, weight_norm,
                          dora_flags, dropout, index, perm, keys, seg, output[1],
                          output[0] if magnitude is not None else None, seed)


def _backward(ctx, dy, _ds):
    (x, weight, bias, A, B, offsets, ranks, scales, magnitude, weight_norm, dora_flags, dropout,
     index, perm, keys, seg, s, y, seed) = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    need_m = ctx.needs_input_grad[8]
    dx = da = db = dmag = dweight = dbias = None
    if need_x or need_a or need_bb or need_m:
        dx, da, db, dmag = multi_lora_bwd(dy, x, weight, bias, A, B, offsets, ranks, scales,
                                          magnitude, weight_norm, dora_flags, dropout, index,
                                          perm, keys, seg, s, y, seed, need_x)
    if need_w:  # a trainable base weight is unusual: plain PyTorch, no fusion
        dyw = dy.float()
        if magnitude is not None:  # DoRA rows: the gradient of g_a * x W^T
            dyw = dyw * _row_factors(magnitude, weight_norm, dora_flags, index, perm, keys)
        dweight = (dyw.t() @ x.float()).to(weight.dtype)
    if need_b:
        dbias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, None, None, (dmag if need_m else None),
            None, None, None, None, None, None, None, None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)
