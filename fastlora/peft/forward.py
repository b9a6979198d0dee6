"""The forward of a patched PEFT LoRA ``Linear``: its LoRA branch fused into the base matmul.

* one active adapter: ``fastlora.lora_linear`` (``x W^T + bias + s * drop(x) A^T B^T``);
  a DoRA adapter: ``fastlora.dora_linear`` with its row norm from the layer's state;
* several active adapters, one adapter dtype, no active dropout (inference, ``generate``,
  dropout-free training): one fused call on the adapters stacked along the rank,
  ``A = cat(A_i)`` and ``B = cat(s_i B_i)`` with scale 1, exactly ``sum_i s_i x A_i^T B_i^T``;
* several active adapters with active dropout (PEFT draws an independent mask per adapter)
  or mixed adapter dtypes: the first adapter fused, each further one added in plain
  PyTorch exactly as PEFT does (same input cast chain, its own ``nn.Dropout``);
* ``adapter_names`` (a different adapter per sequence): ``mixed_batch.peft_mixed_batch_forward``.

Everything else runs PEFT's own ``forward``: merged or disabled adapters, extra forward
arguments, whatever ``reader`` refuses (hooks on the base layer, LoRA variants other than
DoRA, sharded parameters, ...), input/weight dtype mismatches outside autocast (PEFT raises
its own error there), a DoRA adapter active together with others, ``lora_bias``. Only
attribute reads and type/flag checks decide (no data-dependent Python), so
``torch.compile`` traces it without a graph break.
"""
from __future__ import annotations

import torch

from ..functional import dora_linear, lora_linear
from .mixed_batch import peft_mixed_batch_forward
from .reader import FAST_DTYPES, NotFused, read_adapter, read_base
from .state import dora_norm


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``Linear.forward`` with the LoRA branch fused into the base matmul."""
    peft_forward = type(self)._fastlora_original_class.forward
    if not args and kwargs.keys() == {"adapter_names"} and kwargs["adapter_names"] is not None:
        # a mixed batch: PEFT's model-level hook has already rejected unknown names
        names = kwargs["adapter_names"]
        return peft_mixed_batch_forward(self, x, names, known_adapters=names)
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)
    base = read_base(self)
    if isinstance(base, NotFused):
        return peft_forward(self, x)
    adapters = [read_adapter(self, a) for a in self.active_adapters if a in self.lora_A]
    if not adapters or any(isinstance(a, NotFused) for a in adapters):
        return peft_forward(self, x)
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and (x.dtype != base.weight.dtype or x.dtype not in FAST_DTYPES):
        return peft_forward(self, x)
    if (not getattr(self, "cast_input_dtype_enabled", True) and not autocast
            and any(a.A.dtype != x.dtype for a in adapters)):
        return peft_forward(self, x)  # PEFT would not cast x: its error
    if any(a.lora_bias is not None for a in adapters):
        return peft_forward(self, x)
    if any(a.magnitude is not None for a in adapters):
        if len(adapters) > 1:  # the DoRA factor rescales the running sum of several adapters
            return peft_forward(self, x)
        return _dora(self, adapters[0], x, base)
    first = adapters[0]
    same_dtype = all(a.A.dtype == first.A.dtype for a in adapters)
    dropping = any(a.dropout_p() > 0.0 for a in adapters)
    if len(adapters) == 1 or (same_dtype and not dropping):
        if len(adapters) == 1:
            lora_A, lora_B, scaling = first.A, first.B, first.scale
        else:  # stacked along the rank, each scale folded into its B
            lora_A = torch.cat([a.A for a in adapters], dim=0)
            lora_B = torch.cat([a.B * a.scale for a in adapters], dim=1)
            scaling = 1.0
        p = first.dropout_p()
        return lora_linear(x, base.weight, base.bias, lora_A, lora_B, scaling, dropout_p=p,
                           training=p > 0.0)
    return _first_fused(self, adapters, x, base)


def _first_fused(self, adapters, x: torch.Tensor, base) -> torch.Tensor:
    """Dropout on several adapters (independent masks, as PEFT) or mixed adapter dtypes:
    the first adapter fused, the others as PEFT computes them."""
    first = adapters[0]
    p = first.dropout_p()
    result = lora_linear(x, base.weight, base.bias, first.A, first.B, first.scale, dropout_p=p,
                         training=p > 0.0)
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
