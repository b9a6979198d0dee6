"""Which of vLLM's LoRA layers run fastlora's fused op, the takeover of one layer, and the
log line. vLLM 0.32's private API used here (checked per version by
``tests/test_vllm_ops.py``): ``BaseLinearLayerWithLoRA._apply_sync(x, bias)`` (base GEMM,
then ``punica_wrapper.add_lora_linear``), its ``lora_a_stacked`` / ``lora_b_stacked``,
``set_lora(index, ...)`` / ``reset_lora(index)``, ``base_layer`` (``weight``,
``quant_method``), ``punica_wrapper`` and the wrapper's ``update_metadata(mapping, ...)`` and
``token_lora_indices``; ``LoRAModelManager.modules`` and ``lora_slots``.

A layer taken over keeps vLLM's class and forward: its ``_apply_sync`` becomes
``fastlora.multi_lora_linear(x, W, bias, bank, routing)`` (the base GEMM with the expand
folded in, one shrink before it), its stacked LoRA weights become views into a
``StackedAdapters`` bank (vLLM's ``set_lora`` writes them there), and its punica wrapper
makes a ``Routing`` once per step (``StepRouting``).
"""
from __future__ import annotations

import functools
import logging
import math
from collections import Counter

from ..functional import multi_lora_linear
from .stacked import StackedAdapters
from .step import StepRouting

logger = logging.getLogger("vllm.fastlora")

# what never runs fastlora's op, named in the log line whatever the model holds
ALWAYS_VLLMS = ("quantized base layers", "fully-sharded LoRA", "embeddings", "lm_head", "MoE",
                "dual-stream mode", "torch.compile / CUDA graphs (needs enforce_eager)")


def _fused_classes() -> tuple[type, ...]:
    """vLLM's LoRA linear layers whose forward reaches ``_apply_sync`` (exact types: their
    fully-sharded subclasses put a collective between shrink and expand)."""
    from vllm.lora.layers.column_parallel_linear import (
        ColumnParallelLinearWithLoRA, MergedColumnParallelLinearVariableSliceWithLoRA,
        MergedColumnParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA,
        QKVParallelLinearWithLoRA)
    from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

    return (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
            MergedColumnParallelLinearVariableSliceWithLoRA, QKVParallelLinearWithLoRA,
            MergedQKVParallelLinearWithLoRA, RowParallelLinearWithLoRA)


def _kind(layer) -> str:
    """What a LoRA layer fastlora does not fuse is, for the log line."""
    name = type(layer).__name__
    for part, kind in (("Sharded", "fully-sharded LoRA"), ("Embedding", "embeddings"),
                       ("LogitsProcessor", "lm_head"), ("MoE", "MoE"),
                       ("Replicated", "replicated linear")):
        if part in name:
            return kind
    return name


def _runs_base_forward(layer) -> bool:
    """MergedColumnParallelLinearWithLoRA.apply's own test (vLLM 0.32): an unsharded subclass
    of the merged base layer with a forward of its own runs that forward, then vLLM's LoRA,
    never reaching ``_apply_sync``."""
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA
    from vllm.model_executor.custom_op import maybe_get_oot_by_class
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    if not isinstance(layer, MergedColumnParallelLinearWithLoRA) or layer.tp_size != 1:
        return False
    merged = maybe_get_oot_by_class(MergedColumnParallelLinear)
    forward = getattr(type(layer.base_layer), "forward", None)
    return type(layer.base_layer) is not merged and forward is not getattr(merged, "forward", None)


def stays_vllms(layer) -> str | None:
    """Why vLLM LoRA layer ``layer`` keeps vLLM's path (None: fastlora can take it over)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if type(layer) not in _fused_classes():
        return _kind(layer)
    if getattr(layer, "_enable_aux_cuda_stream", False):
        return "dual-stream mode"
    if not isinstance(getattr(layer.base_layer, "quant_method", None), UnquantizedLinearMethod):
        return "quantized base layers"
    if _runs_base_forward(layer):
        return "custom base-layer forward"
    weight = getattr(layer.base_layer, "weight", None)
    slices = [b.shape[2] for b in layer.lora_b_stacked]
    if weight is None or weight.dim() != 2 or tuple(weight.shape) != \
            (sum(slices), layer.lora_a_stacked[0].shape[3]):
        return "no dense base weight of the LoRA weights' shape"
    return None


def _apply_fused(layer, stacked: StackedAdapters, step: StepRouting, x, bias=None):
    """``layer._apply_sync`` of a layer taken over: x ``[..., K]`` -> ``[..., N]``."""
    routing = step.routing(math.prod(x.shape[:-1]))
    if routing is None:  # no adapter in this step: vLLM's own base GEMM
        return layer._get_quant_method().apply(layer.base_layer, x, bias)
    if bias is not None and bias.dtype != x.dtype:  # vLLM's CPU GEMMs may keep an fp32 bias
        bias = bias.to(x.dtype)
    return multi_lora_linear(x, layer.base_layer.weight, bias, stacked.bank, routing)


def _after(method, refresh):
    """``method(index, ...)`` then ``refresh(index)``."""
    @functools.wraps(method)
    def wrapped(index, *args, **kwargs):
        out = method(index, *args, **kwargs)
        refresh(index)
        return out
    return wrapped


def take_over(layer, step: StepRouting) -> StackedAdapters:
    """Make vLLM LoRA layer ``layer`` run fastlora's fused op (``stays_vllms(layer)`` must be
    None); returns its bank."""
    stacked = StackedAdapters.like(layer.lora_a_stacked, layer.lora_b_stacked)
    layer.lora_a_stacked, layer.lora_b_stacked = stacked.lora_a_stacked, stacked.lora_b_stacked
    layer.set_lora = _after(layer.set_lora, stacked.refresh)
    layer.reset_lora = _after(layer.reset_lora, stacked.refresh)
    layer._apply_sync = functools.partial(_apply_fused, layer, stacked, step)
    return stacked


def _step_of(wrapper, slots: int) -> StepRouting:
    """The ``StepRouting`` of a punica wrapper, made (and its ``update_metadata`` hooked)
    on first use."""
    step = getattr(wrapper, "_fastlora_step", None)
    if step is not None:
        return step
    step = wrapper._fastlora_step = StepRouting(slots)
    update = wrapper.update_metadata

    @functools.wraps(update)
    def update_metadata(mapping, *args, **kwargs):
        out = update(mapping, *args, **kwargs)
        step.update(wrapper.token_lora_indices, any(i > 0 for i in mapping.index_mapping))
        return out
    wrapper.update_metadata = update_metadata
    return step


def _compiled() -> str | None:
    """Why the model's forward may be compiled or captured (fastlora's per-step routing is
    eager-only), or None."""
    from vllm.config import CompilationMode, CUDAGraphMode, get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None:
        return "no vLLM config in scope"
    compilation = config.compilation_config
    if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
        return "torch.compile / CUDA graphs (needs enforce_eager)"
    return None


def take_over_all(manager) -> int:
    """Take over every eligible LoRA layer of a vLLM ``LoRAModelManager`` and log one line;
    returns how many were taken over."""
    compiled = _compiled()
    kept: Counter[str] = Counter()
    taken = 0
    for layer in manager.modules.values():
        why = compiled or stays_vllms(layer)
        if why is not None:
            kept[why] += 1
            continue
        take_over(layer, _step_of(layer.punica_wrapper, manager.lora_slots))
        taken += 1
    here = ", ".join(f"{why} ({n})" for why, n in sorted(kept.items())) or "none here"
    logger.info("fastlora: %d of %d LoRA layers run fastlora's fused multi-adapter op; stays "
                "vLLM's: %s; never fused: %s", taken, len(manager.modules), here,
                ", ".join(ALWAYS_VLLMS))
    return taken
