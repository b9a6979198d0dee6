"""fastlora inside vLLM: a ``vllm.general_plugins`` plugin that runs vLLM's LoRA linear
layers (column-parallel, merged QKV, merged gate/up, row-parallel) with
``fastlora.multi_lora_linear``: one shrink, then the base GEMM with every row's expand folded
in, instead of vLLM's base GEMM, shrink and expand.

vLLM loads the entry point (``register``) in every process; it does nothing unless
``FASTLORA_VLLM=1`` (or ``VLLM_PLUGINS`` names ``fastlora``) and the installed vLLM is in
the tested range (``fastlora.vllm.version``). Modules: ``plugin`` (the switch), ``version``
(the gate), ``hooks`` (the vLLM functions wrapped), ``layers`` (which LoRA layers are taken
over, the log line), ``stacked`` (vLLM's per-slot weights held as a ``PackedAdapters``),
``step`` (the per-step ``Routing``). Importing this package does not import vLLM.
"""
from .plugin import register

__all__ = ["register"]
