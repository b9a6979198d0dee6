"""Triton kernels and their thin launchers (installed as ``fastlora.kernels``).

Imports neither ``fastlora.nn`` nor ``peft``. Launchers take 2-D tensors of any strides.
"""
from .backward import DoraBackward, lora_da, lora_dy
from .dora import dora_norm
from .dropout import dropout_mask
from .linear import LowRank, fused_linear
from .shrink import lora_shrink

__all__ = ["DoraBackward", "LowRank", "dora_norm", "dropout_mask", "fused_linear", "lora_da",
           "lora_dy", "lora_shrink"]
