"""Drop-in modules built on the fused ops."""
from .dora_linear import DoraLinear
from .lora_linear import LoraLinear

__all__ = ["DoraLinear", "LoraLinear"]
