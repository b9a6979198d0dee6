"""Pure-PyTorch reference ops: the oracle the tests compare every kernel against.

Shapes follow PEFT: x ``[..., K]``, weight ``[N, K]``, bias ``[N]``, lora_A ``[r, K]``,
lora_B ``[N, r]``. Any float dtype works; the tests run these in float32 (or float64).
A weight may also be bitsandbytes 4-bit (a ``Params4bit`` or a ``fastlora.ops.quant4.Quant4Weight``):
it is decoded by ``Quant4Weight.dequantize`` (fastlora's PyTorch decode of bitsandbytes'
format; bitsandbytes' own CPU ``dequantize_4bit`` is wrong for some shapes, and the tests
check this decode against one done by hand), and the base layer is computed as
bitsandbytes' ``Linear4bit`` does: x and the bias cast to the compute dtype (the view's
``compute_dtype``, else x's), W dequantized straight to it, the result cast back to x's
dtype; the LoRA branch and DoRA's norm take W dequantized to the adapter dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.quant4 import Quant4Weight, is_bnb_4bit


def dequantize_4bit(weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W ``[N, K]`` of a bitsandbytes ``Params4bit`` or a ``Quant4Weight``, decoded by
    ``Quant4Weight.dequantize`` (values computed in fp32, rounded once to ``dtype``; default
    the weight's own dtype)."""
    view = weight if isinstance(weight, Quant4Weight) else Quant4Weight.from_bnb(weight)
    return view.dequantize(dtype)


def _dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """weight itself, or a 4-bit weight dequantized to ``dtype``."""
    if isinstance(weight, Quant4Weight) or is_bnb_4bit(weight):
        return dequantize_4bit(weight, dtype)
    return weight


def _linear(x, weight, bias) -> torch.Tensor:
    """The base layer ``x W^T + bias``; for a 4-bit W as bitsandbytes' ``Linear4bit``."""
    if isinstance(weight, Quant4Weight) or is_bnb_4bit(weight):
        dtype = getattr(weight, "compute_dtype", None) or x.dtype
        cast_bias = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), dequantize_4bit(weight, dtype), cast_bias).to(x.dtype)
    return F.linear(x, weight, bias)


def keep_mask(shape, p: float, *, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """Bernoulli keep-mask (bool, ``shape``) with keep probability ``1 - p``."""
    return torch.rand(shape, generator=generator, device=device) >= p


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p: float = 0.0,
                training: bool = False, dropout_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T``, as PEFT.

    The LoRA branch runs in ``lora_A``'s dtype (PEFT casts x to the adapter dtype), the
    result is cast back to x's dtype. ``dropout_mask`` (bool, x's shape) replaces the
    random mask, so a test can replay the mask a kernel generated.
    """
    result = _linear(x, weight, bias)
    xl = x.to(lora_A.dtype)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = keep_mask(xl.shape, dropout_p, generator=generator, device=xl.device)
        xl = xl * dropout_mask.to(xl.dtype) / (1.0 - dropout_p)
    lora = F.linear(F.linear(xl, lora_A), lora_B) * scaling
    return (result + lora).to(x.dtype)


def dora_weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per output row, ``[N]`` (forms B @ A)."""
    return torch.linalg.norm(_dense(weight, lora_A.dtype) + scaling * (lora_B @ lora_A), dim=1)


def dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude, *, dropout_p: float = 0.0,
                training: bool = False, dropout_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's DoRA Linear (one adapter): ``g = magnitude / ||W + s B A||`` per output row,
    the norm detached.

    Without dropout (or in eval): ``g * (x W^T + s x A^T B^T) + bias``. In training with
    dropout: ``x W^T + bias + (g - 1) * xd W^T + g * s * xd A^T B^T``, xd the dropped x.
    x is cast to the adapter dtype for the branch, as PEFT; the result has x's dtype.
    """
    result = _linear(x, weight, bias)
    xl = x.to(lora_A.dtype)
    w = _dense(weight, xl.dtype).to(xl.dtype)
    if weight_norm is None:
        weight_norm = dora_weight_norm(w, lora_A.detach(), lora_B.detach(), scaling)
    g = magnitude / weight_norm.detach()
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = keep_mask(xl.shape, dropout_p, generator=generator, device=xl.device)
        xl = xl * dropout_mask.to(xl.dtype) / (1.0 - dropout_p)
        base = F.linear(xl, w)
    else:
        base = result - bias if bias is not None else result
    lora = F.linear(F.linear(xl, lora_A), lora_B)
    return (result + (g - 1) * base + g * lora * scaling).to(x.dtype)


def multi_lora_linear(x, weight, bias, bank, adapter_index, *, training: bool = False,
                      dropout_mask: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-adapter linear, a loop over the adapters present: every row is exactly
    ``lora_linear`` / ``dora_linear`` for its adapter, -1 rows the base layer. Reads the
    index on the host (an oracle, not a fast path).

    x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None, bank a
    ``fastlora.adapters.packed.PackedAdapters``, adapter_index ``[...]`` (one per row, -1 = base).

    In training, rows of adapter i see dropout ``bank.dropout[i]``; ``dropout_mask`` (bool,
    x's shape) replaces the random masks, so a test can replay a kernel's mask.
    """
    weight = _dense(weight, x.dtype)
    k, n = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    index = adapter_index.reshape(-1).to(torch.int64)
    mask = dropout_mask.reshape(-1, k) if dropout_mask is not None else None
    y = F.linear(x2, weight, bias)
    offsets, ranks, scales = (bank.offsets.tolist(), bank.ranks.tolist(), bank.scales.tolist())
    dora = bank.is_dora.tolist() if bank.is_dora is not None else [False] * len(ranks)
    drops = bank.dropout.tolist() if training and bank.dropout is not None else [0.0] * len(ranks)
    for a in sorted(set(index.tolist()) - {-1}):
        rows = (index == a).nonzero().squeeze(1)
        lora_A = bank.A[offsets[a]:offsets[a] + ranks[a]]
        lora_B = bank.B[offsets[a]:offsets[a] + ranks[a]].t()
        kw = dict(dropout_p=drops[a], training=drops[a] > 0.0, generator=generator,
                  dropout_mask=mask[rows] if mask is not None else None)
        if dora[a]:
            part = dora_linear(x2[rows], weight, bias, lora_A, lora_B, scales[a],
                                         bank.magnitude[a], weight_norm=bank.weight_norm[a], **kw)
        else:
            part = lora_linear(x2[rows], weight, bias, lora_A, lora_B, scales[a], **kw)
        y = y.index_copy(0, rows, part.to(y.dtype))
    return y.view(*lead, n)
