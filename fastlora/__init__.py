"""fastlora: fused Triton kernels for LoRA in PyTorch.

``lora_linear`` / ``dora_linear`` are the fused ops, ``patch(model)`` accelerates a PEFT
model in place, ``fastlora.reference`` holds the PyTorch oracle.
"""
from . import reference
from .functional import dora_linear, dora_weight_norm, lora_linear
from .patching import PatchReport, is_patched, patch, unpatch

__version__ = "0.1.0"
__all__ = ["PatchReport", "dora_linear", "dora_weight_norm", "is_patched", "lora_linear", "patch",
           "reference", "unpatch"]
