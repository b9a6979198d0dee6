"""fastlora: fused Triton kernels for LoRA in PyTorch.

``lora_linear`` / ``dora_linear`` / ``multi_lora_linear`` are the fused ops (the last one
with a different adapter per row, from an ``AdapterBank`` or ``pack_adapters``; the first
two also take a bitsandbytes 4-bit base weight, a ``Params4bit`` or a ``Quant4Weight``),
``fastlora.nn`` holds drop-in modules, ``patch(model)`` accelerates a PEFT model in place,
``refresh(model)`` drops cached values after writes fastlora cannot see
(``p.data.copy_``), ``fastlora.reference`` holds the PyTorch oracle. ``warmup`` measures
which implementation runs each layer shape and tunes its kernels (before CUDA-graph
capture; ``warmup_multi`` for ``multi_lora_linear``), ``explain`` says.
"""
from . import nn, reference
from .adapters.packed import PackedAdapters, pack_adapters
from .adapters.bank import AdapterBank
from .ops.cache import refresh
from .functional import dora_linear, dora_weight_norm, lora_linear, multi_lora_linear
from .peft import PatchReport, is_patched, patch, unpatch
from .ops.quant4 import Quant4Weight
from .choice.warmup import explain, warmup, warmup_multi

__version__ = "0.1.0"
__all__ = ["AdapterBank", "PackedAdapters", "PatchReport", "dora_linear", "dora_weight_norm",
           "explain", "is_patched", "lora_linear", "multi_lora_linear", "nn", "pack_adapters",
           "patch", "Quant4Weight", "reference", "refresh", "unpatch", "warmup", "warmup_multi"]
