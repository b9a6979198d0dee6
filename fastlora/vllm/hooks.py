"""The vLLM functions the active plugin wraps (vLLM 0.32, private API):

- ``LoRAModelManager._create_lora_modules``: after vLLM wraps the model's layers in its LoRA
  layers, ``fastlora.vllm.layers.take_over_all`` takes over the eligible ones.
- ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``: vLLM's CPU path repacks
  a linear weight for its own GEMM and drops the dense one; with LoRA enabled the dense
  weight is kept (fastlora's op reads it), so it sits in memory beside vLLM's packed copy.
"""
from __future__ import annotations

import functools


def install() -> None:
    """Wrap the functions above (once per process)."""
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.lora.model_manager import LoRAModelManager

    from .layers import take_over_all

    create = LoRAModelManager._create_lora_modules
    if getattr(create, "_fastlora", False):
        return

    @functools.wraps(create)
    def _create_lora_modules(self):
        create(self)
        take_over_all(self)

    _create_lora_modules._fastlora = True
    LoRAModelManager._create_lora_modules = _create_lora_modules

    dispatch = layer_utils.dispatch_cpu_unquantized_gemm

    @functools.wraps(dispatch)
    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool):
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        lora = config is not None and config.lora_config is not None
        return dispatch(layer, remove_weight=remove_weight and not lora)

    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
