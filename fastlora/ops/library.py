"""The Triton path of ``lora_linear`` as ``torch.library`` custom ops with autograd.

Custom ops (with fake implementations) let ``torch.compile(fullgraph=True)`` trace the
layer without a graph break. Saved for backward: x, T = drop(x) A^T (fp32 ``[M, r]``)
and the dropout seed; never the mask, a dropped copy of x, or anything ``M x N``.
The linear stages (forward and dx) run the implementation ``fastlora.choice.dispatch`` chooses
for their shapes, inside the ops' real implementations (so under ``torch.compile`` too).

The base weight is dense (``weight`` ``[N, K]``, ``quant`` empty) or bitsandbytes 4-bit:
``weight`` its packed data (uint8 ``[ceil(N*K / 2)]``), ``quant`` the tensors of its quant
state (absmax, code book, and for a double-quantized absmax absmax2, code2, offset),
``quant_meta`` ``[N, K, blocksize, blocksize2]``, ``compute_dtype`` the dtype its tiles are
dequantized to and the base GEMM runs in (x may have another float dtype). The 4-bit parts
are tensors (the offset too: the kernels load it), so nothing reads the device and a
CUDA graph can capture the ops; the backward saves those same tensors (never a dequantized
copy) and gives the 4-bit weight no gradient.
"""
from __future__ import annotations

import torch

from ..choice import dispatch
from .. import kernels


def _base(weight: torch.Tensor, quant: list[torch.Tensor], quant_meta: list[int] | None,
          compute_dtype: torch.dtype | None) -> torch.Tensor | kernels.Quant4Args:
    """The base weight as the kernels take it: W itself, or the 4-bit ``Quant4Args``."""
    if not quant:
        return weight
    return kernels.Quant4Args.from_parts(weight, quant, quant_meta, compute_dtype)


def _out_features(weight: torch.Tensor, quant_meta: list[int] | None) -> int:
    return quant_meta[0] if quant_meta else weight.shape[0]


@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    dropout_p: float, seed: torch.Tensor | None, quant: list[torch.Tensor],
                    quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``, weight ``[N, K]`` (or 4-bit, see the module docstring); returns y
    ``[M, N]`` (x's dtype), T ``[M, r]`` fp32. seed: int64 ``[1]`` on x's device (the
    kernels load it), None without dropout."""
    t = kernels.lora_shrink(x, lora_A, dropout_p, seed)
    w = _base(weight, quant, quant_meta, compute_dtype)
    y = dispatch.linear(dispatch.FORWARD, x, w.t(), kernels.LowRank(t, lora_B.t(), scaling), bias)
    return y, t


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, quant, quant_meta,
      compute_dtype):
    return (x.new_empty((x.shape[0], _out_features(weight, quant_meta))),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, t: torch.Tensor,
                    scaling: float, dropout_p: float, seed: torch.Tensor | None, need_dx: bool,
                    quant: list[torch.Tensor], quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx ``[M, K]`` or empty, dA ``[r, K]``, dB ``[N, r]``) in their inputs' dtypes;
    the dropout mask is regenerated from the forward's seed tensor."""
    ds, db = kernels.lora_dy(dy, lora_B, t, scaling)
    da = kernels.lora_da(ds, x, lora_A.dtype, dropout_p, seed)
    if need_dx:
        low = kernels.LowRank(ds, lora_A, 1.0 / (1.0 - dropout_p), dropout_p, seed)
        dx = dispatch.linear(dispatch.LORA_DX, dy, _base(weight, quant, quant_meta, compute_dtype),
                             low, out_dtype=x.dtype)
    else:
        dx = x.new_empty((0,))
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_dx, quant,
      quant_meta, compute_dtype):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _save_base(ctx, weight, quant, quant_meta, compute_dtype) -> list[torch.Tensor]:
    """The base weight's tensors to save (what ``_saved_base`` splits off again)."""
    ctx.n_quant, ctx.quant_meta, ctx.compute_dtype = len(quant), quant_meta, compute_dtype
    return [weight, *quant]


def _saved_base(ctx, saved: tuple) -> tuple[tuple, torch.Tensor, list[torch.Tensor]]:
    """(the other saved tensors, weight, quant) from ``ctx.saved_tensors`` laid out as
    ``(*others, *_save_base(...))``."""
    split = len(saved) - 1 - ctx.n_quant
    return saved[:split], saved[split], list(saved[split + 1:])


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, quant, meta, compute = inputs
    ctx.save_for_backward(x, lora_A, lora_B, output[1], seed,
                          *_save_base(ctx, weight, quant, meta, compute))
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
    (x, lora_A, lora_B, t, seed), weight, quant = _saved_base(ctx, ctx.saved_tensors)
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx = da = db = None
    if need_x or need_a or need_bb:
        dx, da, db = lora_linear_bwd(dy, x, weight, lora_A, lora_B, t, ctx.scaling,
                                     ctx.dropout_p, seed, need_x, quant, ctx.quant_meta,
                                     ctx.compute_dtype)
    dweight, dbias = _base_grads(dy, x, weight, ctx.bias_dtype, need_w, need_b)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, None, None, [None] * ctx.n_quant, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastlora::dora_norm", mutates_args=())
def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scaling: float, quant: list[torch.Tensor],
              quant_meta: list[int] | None) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per row, fp32 ``[N]``, no ``N x K`` buffer
    (a 4-bit weight dequantized to fp32 tile by tile)."""
    return kernels.dora_norm(_base(weight, quant, quant_meta, None), lora_A, lora_B, scaling)


@dora_norm.register_fake
def _(weight, lora_A, lora_B, scaling, quant, quant_meta):
    return weight.new_empty((_out_features(weight, quant_meta),), dtype=torch.float32)


@torch.library.custom_op("fastlora::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    g: torch.Tensor, quant: list[torch.Tensor],
                    quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``g * (x W^T + s T B^T) + bias``, g ``[N]`` fp32; returns y and T = x A^T (fp32)."""
    t = kernels.lora_shrink(x, lora_A)
    w = _base(weight, quant, quant_meta, compute_dtype)
    y = dispatch.linear(dispatch.FORWARD, x, w.t(), kernels.LowRank(t, lora_B.t(), scaling),
                        bias, g_out=g)
    return y, t


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, g, quant, quant_meta, compute_dtype):
    return (x.new_empty((x.shape[0], _out_features(weight, quant_meta))),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastlora::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    t: torch.Tensor, y: torch.Tensor, g: torch.Tensor, scaling: float,
                    need_dx: bool, quant: list[torch.Tensor], quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA backward of ``g * dY`` plus ``dg = colsum(dY * (Y - bias)) / g``, one pass over dY.

    Returns (dx or empty, dA, dB, dg ``[N]`` fp32).
    """
    ds, db, dg = kernels.lora_dy(dy, lora_B, t, scaling, kernels.DoraBackward(g, y, bias))
    da = kernels.lora_da(ds, x, lora_A.dtype)
    if need_dx:
        dx = dispatch.linear(dispatch.DORA_DX, dy, _base(weight, quant, quant_meta, compute_dtype),
                             kernels.LowRank(ds, lora_A, 1.0), out_dtype=x.dtype, g_in=g)
    else:
        dx = x.new_empty((0,))
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype), dg / g


@dora_linear_bwd.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, t, y, g, scaling, need_dx, quant, quant_meta,
      compute_dtype):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(g)


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, g, quant, meta, compute = inputs
    ctx.save_for_backward(x, bias, lora_A, lora_B, output[1], output[0], g,
                          *_save_base(ctx, weight, quant, meta, compute))
    ctx.scaling = scaling


def _dora_backward(ctx, dy, _dt):
    (x, bias, lora_A, lora_B, t, y, g), weight, quant = _saved_base(ctx, ctx.saved_tensors)
    need_x, need_w, need_b, need_a, need_bb, _, need_g = ctx.needs_input_grad[:7]
    dx = da = db = dg = None
    if need_x or need_a or need_bb or need_g:
        dx, da, db, dg = dora_linear_bwd(dy, x, weight, bias, lora_A, lora_B, t, y, g,
                                         ctx.scaling, need_x, quant, ctx.quant_meta,
                                         ctx.compute_dtype)
    # the norm is detached: W's gradient is that of g * x W^T
    dweight, dbias = _base_grads(dy, x, weight, bias.dtype if bias is not None else None,
                                 need_w, need_b, g)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, (dg if need_g else None), [None] * ctx.n_quant,
            None, None)


dora_linear_fwd.register_autograd(_dora_backward, setup_context=_dora_setup_context)
