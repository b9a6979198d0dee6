"""Triton kernels and their thin launchers (installed as ``fastlora.kernels``).

Imports neither ``fastlora.nn`` nor ``peft``. Launchers take 2-D tensors of any strides.
One kernel per stage (shrink, linear, dy, dA), for one adapter and, with a ``MULTI``
flag, for batches whose rows use different adapters (``multi_meta``).
"""
from .backward import DoraBackward, lora_da, lora_dy, multi_lora_da, multi_lora_dy
from .dequant4 import dequantize4
from .dora import dora_norm
from .dropout import dropout_mask
from .linear import (LowRank, MultiLowRank, cublas_linear, cublas_unsupported, fused_linear,
                     multi_fused_linear)
from .linear_tma import tma_layout_unsupported, tma_linear, tma_unsupported
from .multi_meta import GATHER_MAX_M, AdapterMeta, RowGroups, RowMap, group_rows
from .quant4 import Quant4Args
from .shrink import lora_shrink, multi_lora_shrink

__all__ = ["GATHER_MAX_M", "AdapterMeta", "DoraBackward", "LowRank", "MultiLowRank", "Quant4Args",
           "RowGroups", "RowMap", "cublas_linear", "cublas_unsupported", "dequantize4",
           "dora_norm", "dropout_mask", "fused_linear", "group_rows", "lora_da", "lora_dy",
           "lora_shrink", "multi_fused_linear", "multi_lora_da", "multi_lora_dy",
           "multi_lora_shrink", "tma_layout_unsupported", "tma_linear", "tma_unsupported"]
