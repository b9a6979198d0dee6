"""fastlora: fused Triton kernels for LoRA in PyTorch.

``lora_linear`` is the fused op; ``fastlora.reference`` holds the PyTorch oracle.
"""
from . import reference
from .functional import lora_linear

__version__ = "0.1.0"
__all__ = ["lora_linear", "reference"]
