"""Everything that knows PEFT: ``patch(model)`` accelerates a PEFT LoRA model in place.

One concern per file: ``reader`` (what a LoRA layer holds, or why fastlora cannot run it),
``forward`` (the patched forward), ``mixed_batch`` (``adapter_names`` batches), ``state``
(the per-layer caches ``patch`` creates and ``unpatch`` removes), ``classes`` (the class
swap), ``report`` (``PatchReport``), ``patching`` (``patch`` / ``unpatch``). PEFT is
imported only when a model is patched (``pip install 'fastlora[peft]'``).
"""
from .mixed_batch import peft_mixed_batch_forward
from .patching import is_patched, patch, unpatch
from .report import LayerReport, PatchReport

__all__ = ["LayerReport", "PatchReport", "is_patched", "patch", "peft_mixed_batch_forward", "unpatch"]
