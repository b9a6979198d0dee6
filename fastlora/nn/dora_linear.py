"""``DoraLinear``: ``LoraLinear`` with DoRA's learned magnitude, for users without PEFT."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cache import DoraNormCache, writes_visible
from ..functional import dora_linear, dora_weight_norm
from .lora_linear import LoraLinear


class DoraLinear(LoraLinear):
    """``y = g * (x W^T + s x A^T B^T) + b``, ``g = magnitude / ||W + s B A||`` per row.

    magnitude ``[out]`` (adapter dtype) starts at ``||W||`` per row, so a new layer equals
    its base. The detached row norm is cached while W, A, B and s are unchanged (see
    ``fastlora.ops.cache`` for what that detects; ``fastlora.refresh`` after ``p.data.copy_``),
    so inference costs what LoRA costs.
    """

    def _init(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype):
        super()._init(weight, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)
        norm = dora_weight_norm(weight.detach(), self.lora_A.detach(), self.lora_B.detach(),
                                self.scaling)
        self.magnitude = nn.Parameter(norm.to(adapter_dtype))
        self._norms = DoraNormCache()
        self._merged_norm = None

    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` per row (fp32, detached), from the cache when still valid."""
        return self._norms.get(None, self.weight, self.lora_A, self.lora_B, self.scaling,
                               keep=writes_visible(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           self.magnitude, dropout_p=self.lora_dropout, training=self.training,
                           weight_norm=self.weight_norm())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight: ``W <- g * (W + s B A)`` per row."""
        if self.merged:
            raise RuntimeError("DoraLinear is already merged")
        norm = self.weight_norm()
        g = (self.magnitude.float() / norm)[:, None]
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        self.weight.copy_((g * (self.weight.float() + delta)).to(self.weight.dtype))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` with the norm it used (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("DoraLinear is not merged")
        g = (self.magnitude.float() / self._merged_norm)[:, None]
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        self.weight.copy_((self.weight.float() / g - delta).to(self.weight.dtype))
        self._merged_norm = None
        self.merged = False
