"""A per-adapter cache of DoRA's row norm, valid while the parameters it came from are."""
from __future__ import annotations

import weakref

import torch

from .functional import dora_weight_norm


def _stamp(t: torch.Tensor) -> tuple:
    """Identity (of the viewed tensor, so a fresh ``W.t()`` view still matches) + version."""
    owner = t._base if t._base is not None else t
    return (weakref.ref(owner), t._version, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _same(a: tuple, b: tuple) -> bool:
    return a[0]() is not None and a[0]() is b[0]() and a[1:] == b[1:]


class DoraNormCache:
    """Remembers ``||W + s B A||`` per key while W, A, B (the same tensor objects, at the
    same version counter) and s are unchanged: an in-place update (an optimizer step, a
    merge), a replaced parameter or a new scale recomputes it, so a cached norm is never
    stale. Under ``torch.compile`` it recomputes every call (a version counter is not
    traceable). Copies and pickles start empty."""

    def __init__(self):
        self._entries: dict[object, tuple[tuple, torch.Tensor]] = {}

    def get(self, key, weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return dora_weight_norm(weight, lora_A, lora_B, scaling)
        stamps = (_stamp(weight), _stamp(lora_A), _stamp(lora_B))
        hit = self._entries.get(key)
        if hit is not None and hit[0][3] == float(scaling) and all(
                _same(old, new) for old, new in zip(hit[0][:3], stamps)):
            return hit[1]
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
        self._entries[key] = ((*stamps, float(scaling)), norm)
        return norm

    def clear(self) -> None:
        self._entries.clear()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._entries = {}
