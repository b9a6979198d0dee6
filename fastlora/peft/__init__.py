"""Everything that knows PEFT: ``patch(model)`` accelerates a PEFT LoRA model in place.

PEFT is imported only when a model is patched (``pip install 'fastlora[peft]'``).
"""
from .mixed_batch import peft_mixed_batch_forward
from .patching import is_patched, patch, unpatch
from .report import LayerReport, PatchReport

__all__ = ["LayerReport", "PatchReport", "is_patched", "patch", "peft_mixed_batch_forward", "unpatch"]
