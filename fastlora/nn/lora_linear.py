"""``LoraLinear``: a drop-in ``nn.Linear`` with a LoRA adapter, for users without PEFT."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cache import writes_visible
from ..choice.plans import LoraPlans, lora_linear


class LoraLinear(nn.Module):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T`` with W, b frozen.

    weight ``[out, in]``, bias ``[out]``, lora_A ``[r, in]`` (Kaiming-uniform init),
    lora_B ``[out, r]`` (zeros, so a new layer equals its base). scaling is
    ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). The adapter is kept in
    ``adapter_dtype`` (fp32 by default, as PEFT) whatever the base dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False, *,
                 adapter_dtype: torch.dtype = torch.float32, device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)

    def _init(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype):
        if r < 1:
            raise ValueError(f"r must be a positive rank, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=weight.device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self._plans = LoraPlans()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, *, adapter_dtype: torch.dtype = torch.float32
                    ) -> "LoraLinear":
        """Wrap ``linear``, sharing (not copying) its weight and bias parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora,
                    adapter_dtype)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training,
                           plans=self._plans if writes_visible(self) else None)

    @torch.no_grad()
    def _delta_into_weight(self, sign: float) -> None:
        delta = (self.lora_B.float() @ self.lora_A.float()) * (sign * self.scaling)
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    def merge(self) -> None:
        """Fold ``scaling * B @ A`` into the weight (for inference); forward then skips LoRA."""
        if self.merged:
            raise RuntimeError("LoraLinear is already merged")
        self._delta_into_weight(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Take the adapter back out of the weight (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("LoraLinear is not merged")
        self._delta_into_weight(-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, merged={self.merged}")
