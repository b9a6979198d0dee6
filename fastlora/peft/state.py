"""The one object fastlora keeps on a patched LoRA layer: ``patch`` creates it, ``unpatch``
removes it whole. It holds the layer's caches: DoRA row norms per adapter (shared by the
plain and the mixed-batch forward) and the packed adapters of the last inference mixed
batch. Copies and pickles of a patched layer get an empty one."""
from __future__ import annotations

import torch

from ..dora_cache import DoraNormCache
from ..functional import dora_weight_norm

ATTR = "_fastlora_state"


def _stamp(t: torch.Tensor) -> tuple:
    owner = t._base if t._base is not None else t  # a fresh W.t() view still matches
    return (id(owner), t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride(), t.device)


class LayerState:
    def __init__(self):
        self.norms = DoraNormCache()
        self._bank = None  # (stamp, packed adapters, the stamped tensors)

    def clear(self) -> None:
        self.norms.clear()
        self._bank = None

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def attach(layer) -> None:
    layer.__dict__[ATTR] = LayerState()


def detach(layer) -> None:
    layer.__dict__.pop(ATTR, None)


def state_of(layer) -> LayerState | None:
    return layer.__dict__.get(ATTR)


def dora_norm(layer, name: str, weight, lora_A, lora_B, scale) -> torch.Tensor:
    """``||W + s B A||`` per row for adapter ``name`` (fp32, detached), from the layer's
    state when it has one."""
    state = state_of(layer)
    if state is None:
        return dora_weight_norm(weight, lora_A, lora_B, scale)
    return state.norms.get(name, weight, lora_A, lora_B, scale)


def cached_bank(layer, tensors: list, extra: tuple, build):
    """``build()`` (packed adapters made from ``tensors`` and the facts in ``extra``), reused
    while those are unchanged when the layer has a state."""
    state = state_of(layer)
    if state is None:
        return build()
    stamp = (tuple(_stamp(t) for t in tensors), extra)
    if state._bank is not None and state._bank[0] == stamp:
        return state._bank[1]
    bank = build()
    # the entry keeps the stamped tensors alive, so their ids and storages are not recycled
    state._bank = (stamp, bank, [t._base if t._base is not None else t for t in tensors])
    return bank
