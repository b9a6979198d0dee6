"""fastlora: fused Triton kernels for LoRA in PyTorch.

``lora_linear`` / ``dora_linear`` / ``multi_lora_linear`` are the fused ops (the last one
with a different adapter per row, from an ``AdapterBank``), ``patch(model)`` accelerates a
PEFT model in place, ``refresh(model)`` drops cached values after writes fastlora cannot
see (``p.data.copy_``), ``fastlora.reference`` holds the PyTorch oracle.
"""
from . import reference
from .bank import AdapterBank
from .cache import refresh
from .functional import dora_linear, dora_weight_norm, lora_linear
from .multi import multi_lora_linear
from .peft import PatchReport, is_patched, patch, unpatch

__version__ = "0.1.0"
__all__ = ["AdapterBank", "PatchReport", "dora_linear", "dora_weight_norm", "is_patched",
           "lora_linear", "multi_lora_linear", "patch", "reference", "refresh", "unpatch"]
