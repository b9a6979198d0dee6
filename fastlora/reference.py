"""Pure-PyTorch reference ops: the oracle the tests compare every kernel against.

Shapes follow PEFT: x ``[..., K]``, weight ``[N, K]``, bias ``[N]``, lora_A ``[r, K]``,
lora_B ``[N, r]``. Any float dtype works; the tests run these in float32 (or float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    result = F.linear(x, weight, bias)
    xl = x.to(lora_A.dtype)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = keep_mask(xl.shape, dropout_p, generator=generator, device=xl.device)
        xl = xl * dropout_mask.to(xl.dtype) / (1.0 - dropout_p)
    lora = F.linear(F.linear(xl, lora_A), lora_B) * scaling
    return (result + lora).to(x.dtype)


def dora_weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per output row, ``[N]`` (forms B @ A)."""
    return torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)


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
    result = F.linear(x, weight, bias)
    xl = x.to(lora_A.dtype)
    w = weight.to(xl.dtype)
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
