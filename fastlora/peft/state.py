"""The one object fastlora keeps on a patched LoRA layer: ``patch`` creates it, ``unpatch``
removes it whole. It holds the layer's caches, valid by the rule of ``fastlora.ops.cache``: the
reader's decisions per set of active adapters (``reader.read_active``), DoRA row norms per
adapter (shared by the plain and the mixed-batch forward), the packed adapters of the last
inference mixed batch and the launch plans of ``lora_linear`` (``fastlora.choice.plans``). A
layer under FSDP keeps nothing; PEFT's merge / unmerge (writes through ``.data``) clear it;
``fastlora.refresh`` clears it. Copies and pickles of a patched layer get an empty one."""
from __future__ import annotations

import torch

from ..ops.cache import Cache, DoraNormCache, Stamped, writes_visible
from ..choice.plans import LoraPlans

ATTR = "_fastlora_state"


class LayerState(Cache):
    def __init__(self):
        self.readings: dict[tuple[str, ...], Stamped] = {}
        self.norms = DoraNormCache()
        self.bank: Stamped | None = None
        self.plans = LoraPlans()

    def clear(self) -> None:
        self.readings.clear()
        self.norms.clear()
        self.bank = None
        self.plans.clear()


def attach(layer) -> None:
    layer.__dict__[ATTR] = LayerState()


def detach(layer) -> None:
    layer.__dict__.pop(ATTR, None)


def clear(layer) -> None:
    """Drop the layer's caches (if it has a state)."""
    state = layer.__dict__.get(ATTR)
    if state is not None:
        state.clear()


def state_of(layer) -> LayerState | None:
    """The layer's state if it may keep values now (patched, not managed by FSDP)."""
    state = layer.__dict__.get(ATTR)
    if state is None or not writes_visible(layer, layer._modules["base_layer"]):
        return None
    return state


def dora_norm(layer, name: str, weight, lora_A, lora_B, scale) -> torch.Tensor:
    """``||W + s B A||`` per row for adapter ``name`` (fp32 ``[N]``, detached)."""
    state = state_of(layer)
    keep = state is not None
    norms = state.norms if keep else DoraNormCache()
    return norms.get(name, weight, lora_A, lora_B, scale, keep=keep)


def cached_bank(layer, tensors: list, extra: tuple, build):
    """``build()``'s packed adapters (made from ``tensors`` and the facts in ``extra``),
    reused while those are unchanged."""
    state = state_of(layer)
    if state is None or torch.compiler.is_compiling():
        return build()
    if state.bank is not None and state.bank.valid_for(tensors, extra):
        return state.bank.value
    bank = build()
    state.bank = Stamped(tensors, extra, bank)
    return bank
