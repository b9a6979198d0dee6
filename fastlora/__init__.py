"""fastlora: fused Triton kernels for LoRA in PyTorch.

``lora_linear`` is the fused op; ``fastlora.reference`` holds the PyTorch oracle.
"""
from . import reference
from .functional import dora_linear, dora_weight_norm, lora_linear

__version__ = "0.1.0"
__all__ = ["dora_linear", "dora_weight_norm", "lora_linear", "reference"]
