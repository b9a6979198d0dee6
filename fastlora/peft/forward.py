"""The forward of a patched PEFT LoRA ``Linear``: its LoRA branch fused into the base matmul."""
from __future__ import annotations

import torch
from torch import nn

from ..functional import dora_linear, lora_linear
from .mixed_batch import peft_mixed_batch_forward
from .reader import _FAST_DTYPES, _LINEAR_FORWARD, _is_conv1d, _is_dora


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``Linear.forward`` with the LoRA branch fused into the base matmul.

    Only attribute reads and type/flag checks decide between the fused path and PEFT's
    own forward (no data-dependent Python), so torch.compile traces it without a break.
    """
    peft_forward = type(self)._fastlora_original_class.forward
    if not args and kwargs.keys() == {"adapter_names"} and kwargs["adapter_names"] is not None:
        # a mixed batch: PEFT's model-level hook has already rejected unknown names
        names = kwargs["adapter_names"]
        return peft_mixed_batch_forward(self, x, names, known_adapters=names)
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)
    base = self.base_layer
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        # hooks (DeepSpeed, user) or a replaced forward (accelerate offload): PEFT calls
        # base_layer(x), the fused op would bypass them
        return peft_forward(self, x, *args, **kwargs)
    if isinstance(base, nn.Linear) and type(base).forward is _LINEAR_FORWARD:
        weight = base.weight
    elif _is_conv1d(base):
        weight = base.weight.t()  # Conv1D stores [K, N]: a transposed view, no copy
    else:
        return peft_forward(self, x, *args, **kwargs)
    bias = base.bias

    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and (x.dtype != weight.dtype or x.dtype not in _FAST_DTYPES):
        return peft_forward(self, x, *args, **kwargs)
    cast_input = getattr(self, "cast_input_dtype_enabled", True)

    names = [a for a in self.active_adapters if a in self.lora_A]
    if not names:
        return peft_forward(self, x, *args, **kwargs)
    adapter_dtype = self.lora_A[names[0]].weight.dtype
    variants = getattr(self, "lora_variant", {})  # PEFT < 0.16: DoRA flagged in use_dora only
    lora_bias = getattr(self, "lora_bias", {})
    same_dtype = True
    dropping = False
    dora = False
    for a in names:
        is_dora = _is_dora(self, a)
        if lora_bias.get(a, False) or (a in variants and not is_dora):
            return peft_forward(self, x, *args, **kwargs)
        dora = dora or is_dora
        drop = self.lora_dropout[a]
        if type(drop) is nn.Dropout:
            if drop.training and drop.p > 0.0:
                if drop.p >= 1.0:
                    return peft_forward(self, x, *args, **kwargs)
                dropping = True
        elif type(drop) is not nn.Identity:
            return peft_forward(self, x, *args, **kwargs)
        a_dtype = self.lora_A[a].weight.dtype
        if a_dtype not in _FAST_DTYPES or self.lora_B[a].weight.dtype != a_dtype:
            return peft_forward(self, x, *args, **kwargs)
        if a_dtype != adapter_dtype:
            same_dtype = False
        if not cast_input and not autocast and a_dtype != x.dtype:
            return peft_forward(self, x, *args, **kwargs)  # PEFT would not cast x: its error

    first = names[0]
    if dora:
        if len(names) > 1:  # the DoRA factor rescales the running sum of several adapters
            return peft_forward(self, x, *args, **kwargs)
        return _dora_forward(self, first, x, weight, bias)
    if len(names) == 1 or (same_dtype and not dropping):
        if len(names) == 1:
            lora_A = self.lora_A[first].weight
            lora_B = self.lora_B[first].weight
            scaling = self.scaling[first]
        else:  # stacked along the rank, each scale folded into its B
            lora_A = torch.cat([self.lora_A[a].weight for a in names], dim=0)
            lora_B = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in names], dim=1)
            scaling = 1.0
        drop = self.lora_dropout[first]
        p = drop.p if (type(drop) is nn.Dropout and drop.training) else 0.0
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=p, training=p > 0.0)

    # Dropout on several adapters (independent masks, as PEFT) or mixed adapter dtypes:
    # the first adapter fused, the others as PEFT computes them.
    drop = self.lora_dropout[first]
    p = drop.p if (type(drop) is nn.Dropout and drop.training) else 0.0
    result = lora_linear(x, weight, bias, self.lora_A[first].weight, self.lora_B[first].weight,
                         self.scaling[first], dropout_p=p, training=p > 0.0)
    result_dtype = result.dtype
    xl = x
    for a in names:  # the input cast chain of PEFT's loop, first adapter included
        lora_A = self.lora_A[a]
        if cast_input and xl.dtype != lora_A.weight.dtype:
            xl = xl.to(lora_A.weight.dtype)
        if a == first:
            continue
        result = result + self.lora_B[a](lora_A(self.lora_dropout[a](xl))) * self.scaling[a]
    return result.to(result_dtype)


def _dora_forward(self, a: str, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """One active DoRA adapter: ``fastlora.dora_linear`` with the row norm from the layer's
    cache (valid while W, A, B and the scale are unchanged)."""
    lora_A = self.lora_A[a].weight
    lora_B = self.lora_B[a].weight
    scaling = self.scaling[a]
    norms = self.__dict__.get("_fastlora_dora_norms")
    norm = norms.get(a, weight, lora_A, lora_B, scaling) if norms is not None else None
    drop = self.lora_dropout[a]
    p = drop.p if (type(drop) is nn.Dropout and drop.training) else 0.0
    return dora_linear(x, weight, bias, lora_A, lora_B, scaling,
                       self.lora_magnitude_vector[a].weight, dropout_p=p, training=p > 0.0,
                       weight_norm=norm)
