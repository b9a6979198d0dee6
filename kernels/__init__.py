"""Triton kernels and their thin launchers (installed as ``fastlora.kernels``).

Imports neither ``fastlora.nn`` nor ``peft``. Launchers take 2-D tensors of any strides.
"""
from .backward import DoraBackward, lora_da, lora_dy
from .dequant4 import dequantize4
from .dora import dora_norm
from .dropout import dropout_mask
from .linear import LowRank, cublas_linear, cublas_unsupported, fused_linear
from .linear_tma import tma_layout_unsupported, tma_linear, tma_unsupported
from .multi_backward import multi_lora_da, multi_lora_dy
from .multi_linear import MultiLowRank, multi_fused_linear
from .multi_meta import RowGroups, group_rows
from .multi_shrink import multi_lora_shrink
from .quant4 import Quant4Args
from .shrink import lora_shrink

__all__ = ["DoraBackward", "LowRank", "MultiLowRank", "Quant4Args", "RowGroups", "cublas_linear",
           "cublas_unsupported", "dequantize4", "dora_norm", "dropout_mask", "fused_linear",
           "group_rows", "lora_da", "lora_dy", "lora_shrink", "multi_fused_linear",
           "multi_lora_da", "multi_lora_dy", "multi_lora_shrink",
           "tma_layout_unsupported", "tma_linear", "tma_unsupported"]
