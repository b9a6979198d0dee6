"""The forward of a patched PEFT LoRA ``Linear``: its LoRA branch fused into the base matmul.

* one active adapter: ``fastlora.lora_linear`` (``x W^T + bias + s * drop(x) A^T B^T``);
  a DoRA adapter: ``fastlora.dora_linear`` with its row norm from the layer's state;
* several active adapters, one adapter dtype, no active dropout (inference, ``generate``,
  dropout-free training): one fused call on the adapters stacked along the rank,
  ``A = cat(A_i)`` and ``B = cat(s_i B_i)`` with scale 1, exactly ``sum_i s_i x A_i^T B_i^T``;
  with DoRA adapters among them, one ``dora_linear`` call that reproduces PEFT's running
  result (see ``_dora_stacked``);
* several active adapters with active dropout (PEFT draws an independent mask per adapter)
  or mixed adapter dtypes, none DoRA: the first adapter fused, each further one added in
  plain PyTorch exactly as PEFT does (same input cast chain, its own ``nn.Dropout``);
* ``lora_bias``: lora_B's bias enters the fused bias, ``bias + s * b_B`` (autograd gives
  ``b_B`` its gradient);
* ``adapter_names`` (a different adapter per sequence): ``mixed_batch.peft_mixed_batch_forward``,
  on the batch's routing made once per model call.

Everything else runs PEFT's own ``forward``: merged or disabled adapters, extra forward
arguments, whatever ``reader`` refuses (hooks on the base layer, LoRA variants other than
DoRA, sharded parameters, ...), input/weight dtype mismatches outside autocast (PEFT raises
its own error there), a DoRA adapter active with others while dropout is active or adapter
dtypes differ. Only attribute reads and type/flag checks decide (no data-dependent Python),
so ``torch.compile`` traces it without a graph break.
"""
from __future__ import annotations

import torch
from torch import nn

from ..functional import dora_linear
from ..choice.plans import lora_linear
from .mixed_batch import peft_mixed_batch_forward
from .reader import BNB_4BIT, FAST_DTYPES, Adapter, Base, NotFused, read_active
from . import state
from .state import dora_norm


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``Linear.forward`` with the LoRA branch fused into the base matmul."""
    peft_forward = type(self)._fastlora_original_class.forward
    if not args and kwargs.keys() == {"adapter_names"} and kwargs["adapter_names"] is not None:
        # a mixed batch (names, or the batch's routing from mixed_batch.routing_hooks): PEFT's
        # model-level hook has already rejected unknown names
        names = kwargs["adapter_names"]
        return peft_mixed_batch_forward(self, x, names, known_adapters=names)
    # PEFT's disable_adapters and merged properties, read from their fields
    if args or kwargs or self._disable_adapters or self.merged_adapters:
        return peft_forward(self, x, *args, **kwargs)
    kept = state.state_of(self)
    read = read_active(self, kept.readings if kept is not None else None)
    if isinstance(read, NotFused):
        return peft_forward(self, x)
    base, adapters = read
    autocast = torch.is_autocast_enabled(x.device.type)
    # a bitsandbytes 4-bit base casts x to its compute dtype (x may have any float dtype)
    same = base.kind == BNB_4BIT or x.dtype == base.weight.dtype
    if not autocast and (not same or x.dtype not in FAST_DTYPES):
        return peft_forward(self, x)
    if (not getattr(self, "cast_input_dtype_enabled", True) and not autocast
            and any(a.A.dtype != x.dtype for a in adapters)):
        return peft_forward(self, x)  # PEFT would not cast x: its error
    first = adapters[0]
    if len(adapters) == 1:
        if first.magnitude is not None:
            return _dora(self, first, x, base)
        p = first.dropout_p()
        return lora_linear(x, base.weight, _bias(base, adapters), first.A, first.B, first.scale,
                           dropout_p=p, training=p > 0.0,
                           plans=kept.plans if kept is not None else None)
    same_dtype = all(a.A.dtype == first.A.dtype for a in adapters)
    dropping = any(a.dropout_p() > 0.0 for a in adapters)
    if any(a.magnitude is not None for a in adapters):
        if dropping or not same_dtype or any(_dropped_dora(self, a) for a in adapters):
            return peft_forward(self, x)
        return _dora_stacked(self, adapters, x, base)
    if same_dtype and not dropping:  # stacked along the rank, each scale folded into its B
        lora_A = torch.cat([a.A for a in adapters], dim=0)
        lora_B = torch.cat([a.B * a.scale for a in adapters], dim=1)
        return lora_linear(x, base.weight, _bias(base, adapters), lora_A, lora_B, 1.0)
    return _first_fused(self, adapters, x, base)


def _bias(base: Base, adapters: list[Adapter], factors: list | None = None):
    """The fused bias: the base bias plus ``f_i * s_i * b_i`` for each adapter with a lora_B
    bias ``b_i`` (``f_i``: its DoRA column factor ``[N]``, default 1), in the weight's dtype."""
    if len(adapters) == 1 and adapters[0].lora_bias is None:
        return base.bias
    terms = [(a, f) for a, f in zip(adapters, factors or [None] * len(adapters))
             if a.lora_bias is not None]
    if not terms:
        return base.bias
    total = base.bias.float() if base.bias is not None else 0.0
    for a, f in terms:
        term = a.lora_bias.float() * a.scale
        total = total + (term if f is None else term * f)
    return total.to(base.weight.dtype)


def _dropped_dora(self, a: Adapter) -> bool:
    """PEFT's DoRA forward in training with a dropout module adds ``(g - 1) drop(x) W^T``
    to the running result instead of rescaling it."""
    return a.magnitude is not None and type(a.dropout) is not nn.Identity and self.training


def _first_fused(self, adapters, x: torch.Tensor, base) -> torch.Tensor:
    """Dropout on several adapters (independent masks, as PEFT) or mixed adapter dtypes:
    the first adapter fused, the others as PEFT computes them."""
    first = adapters[0]
    p = first.dropout_p()
    result = lora_linear(x, base.weight, _bias(base, [first]), first.A, first.B, first.scale,
                         dropout_p=p, training=p > 0.0)
    result_dtype = result.dtype
    cast_input = getattr(self, "cast_input_dtype_enabled", True)
    xl = x
    for a in adapters:  # the input cast chain of PEFT's loop, first adapter included
        if cast_input and xl.dtype != a.A.dtype:
            xl = xl.to(a.A.dtype)
        if a is first:
            continue
        lora_A, lora_B = self.lora_A[a.name], self.lora_B[a.name]
        result = result + lora_B(lora_A(a.dropout(xl))) * a.scale
    return result.to(result_dtype)


def _dora(self, a, x: torch.Tensor, base) -> torch.Tensor:
    """One active DoRA adapter: ``fastlora.dora_linear`` with the row norm from the layer's
    state."""
    norm = dora_norm(self, a.name, base.weight, a.A, a.B, a.scale)
    p = a.dropout_p()
    return dora_linear(x, base.weight, base.bias, a.A, a.B, a.scale, a.magnitude, dropout_p=p,
                       training=p > 0.0, weight_norm=norm)


def _dora_stacked(self, adapters: list[Adapter], x: torch.Tensor, base: Base) -> torch.Tensor:
    """Several active adapters, some DoRA, no active dropout: PEFT's loop in one fused call.

    PEFT keeps a running result R (base output first) and, adapter by adapter, adds
    ``s B A x`` (LoRA) or, for a DoRA adapter with factor ``g = m / ||W + s B A||``
    (detached norm), sets ``R <- g * (R - bias) + bias + g * s B A x``. So the output is
    ``c * x W^T + bias + sum_j d_j * s_j B_j A_j x``, with ``c`` the product of every g and
    ``d_j`` the product of the g of the DoRA adapters from j on. That is ``dora_linear``
    with factor ``c`` and the adapters stacked along the rank, ``B_j`` scaled by
    ``s_j d_j / c = s_j / (product of the g before j)``; lora_B biases enter the bias
    with ``d_j``. Gradients reach every A, B and magnitude through autograd. A DoRA factor
    of exactly 0 in some row (a zero magnitude entry) makes that row NaN here.
    """
    gs = [None if a.magnitude is None else
          a.magnitude.float() / dora_norm(self, a.name, base.weight, a.A, a.B, a.scale)
          for a in adapters]
    before, lora_B = None, []  # before: the product of the DoRA factors so far
    for a, g in zip(adapters, gs):
        b = a.B.float() * a.scale
        lora_B.append((b if before is None else b / before[:, None]).to(a.A.dtype))
        if g is not None:
            before = g if before is None else before * g
    after, factors = None, []  # after: the product of the DoRA factors from j on
    for g in reversed(gs):
        if g is not None:
            after = g if after is None else after * g
        factors.append(after)
    factors.reverse()
    lora_A = torch.cat([a.A for a in adapters], dim=0)
    ones = torch.ones_like(before)
    return dora_linear(x, base.weight, _bias(base, adapters, factors), lora_A,
                       torch.cat(lora_B, dim=1), 1.0, before, weight_norm=ones)
