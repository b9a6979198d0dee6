"""Drop-in modules built on the fused ops."""
from .lora_linear import LoraLinear

__all__ = ["LoraLinear"]
