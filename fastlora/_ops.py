"""The Triton path of ``lora_linear`` as ``torch.library`` custom ops with autograd.

Custom ops (with fake implementations) let ``torch.compile(fullgraph=True)`` trace the
layer without a graph break. Saved for backward: x, T = drop(x) A^T (fp32 ``[M, r]``)
and the dropout seed; never the mask, a dropped copy of x, or anything ``M x N``.
The linear stages (forward and dx) run the implementation ``fastlora.dispatch`` chooses
for their shapes, inside the ops' real implementations (so under ``torch.compile`` too).
"""
from __future__ import annotations

import torch

from . import dispatch, kernels


@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    dropout_p: float, seed: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``, weight ``[N, K]``; returns y ``[M, N]`` (x's dtype), T ``[M, r]`` fp32.
    seed: int64 ``[1]`` on x's device (the kernels load it), None without dropout."""
    t = kernels.lora_shrink(x, lora_A, dropout_p, seed)
    y = dispatch.linear(dispatch.FORWARD, x, weight.t(), kernels.LowRank(t, lora_B.t(), scaling),
                        bias)
    return y, t


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, t: torch.Tensor,
                    scaling: float, dropout_p: float, seed: torch.Tensor | None, need_dx: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx ``[M, K]`` or empty, dA ``[r, K]``, dB ``[N, r]``) in their inputs' dtypes;
    the dropout mask is regenerated from the forward's seed tensor."""
    ds, db = kernels.lora_dy(dy, lora_B, t, scaling)
    da = kernels.lora_da(ds, x, lora_A.dtype, dropout_p, seed)
    if need_dx:
        low = kernels.LowRank(ds, lora_A, 1.0 / (1.0 - dropout_p), dropout_p, seed)
        dx = dispatch.linear(dispatch.LORA_DX, dy, weight, low, out_dtype=x.dtype)
    else:
        dx = x.new_empty((0,))
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _base_grads(dy, x, weight, bias_dtype, need_w: bool, need_b: bool, g=None):
    """Gradients of the frozen-by-default base: weight (of ``g * x W^T`` when g is given;
    a trainable base weight is unusual: plain PyTorch, no fusion) and bias."""
    dweight = dbias = None
    if need_w:
        dy_w = dy if g is None else dy.float() * g
        dweight = dy_w.t().to(weight.dtype) @ x.to(weight.dtype)
    if need_b:
        dbias = dy.sum(0, dtype=torch.float32).to(bias_dtype)
    return dweight, dbias


def _backward(ctx, dy, _dt):
    x, weight, lora_A, lora_B, t, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx = da = db = None
    if need_x or need_a or need_bb:
        dx, da, db = lora_linear_bwd(dy, x, weight, lora_A, lora_B, t, ctx.scaling,
                                     ctx.dropout_p, seed, need_x)
    dweight, dbias = _base_grads(dy, x, weight, ctx.bias_dtype, need_w, need_b)
    return (dx if need_x else None), dweight, dbias, (da if need_a else None), \
        (db if need_bb else None), None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastlora::dora_norm", mutates_args=())
def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per row, fp32 ``[N]``, no ``N x K`` buffer."""
    return kernels.dora_norm(weight, lora_A, lora_B, scaling)


@dora_norm.register_fake
def _(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastlora::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g * (x W^T + s T B^T) + bias``, g ``[N]`` fp32; returns y and T = x A^T (fp32)."""
    t = kernels.lora_shrink(x, lora_A)
    y = dispatch.linear(dispatch.FORWARD, x, weight.t(), kernels.LowRank(t, lora_B.t(), scaling),
                        bias, g_out=g)
    return y, t


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, g):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastlora::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    t: torch.Tensor, y: torch.Tensor, g: torch.Tensor, scaling: float,
                    need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA backward of ``g * dY`` plus ``dg = colsum(dY * (Y - bias)) / g``, one pass over dY.

    Returns (dx or empty, dA, dB, dg ``[N]`` fp32).
    """
    ds, db, dg = kernels.lora_dy(dy, lora_B, t, scaling, kernels.DoraBackward(g, y, bias))
    da = kernels.lora_da(ds, x, lora_A.dtype)
    if need_dx:
        dx = dispatch.linear(dispatch.DORA_DX, dy, weight, kernels.LowRank(ds, lora_A, 1.0),
                             out_dtype=x.dtype, g_in=g)
    else:
        dx = x.new_empty((0,))
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype), dg / g


@dora_linear_bwd.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, t, y, g, scaling, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(g)


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, g = inputs
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, output[1], output[0], g)
    ctx.scaling = scaling


def _dora_backward(ctx, dy, _dt):
    x, weight, bias, lora_A, lora_B, t, y, g = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb, _, need_g = ctx.needs_input_grad
    dx = da = db = dg = None
    if need_x or need_a or need_bb or need_g:
        dx, da, db, dg = dora_linear_bwd(dy, x, weight, bias, lora_A, lora_B, t, y, g,
                                         ctx.scaling, need_x)
    # the norm is detached: W's gradient is that of g * x W^T
    dweight, dbias = _base_grads(dy, x, weight, bias.dtype if bias is not None else None,
                                 need_w, need_b, g)
    return (dx if need_x else None), dweight, dbias, (da if need_a else None), \
        (db if need_bb else None), None, (dg if need_g else None)


dora_linear_fwd.register_autograd(_dora_backward, setup_context=_dora_setup_context)
