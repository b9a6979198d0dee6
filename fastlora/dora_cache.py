"""A per-adapter cache of DoRA's row norm, valid while the parameters it came from are."""
from __future__ import annotations

import torch

from .functional import dora_weight_norm


def _stamp(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape))


class DoraNormCache:
    """Remembers ``||W + s B A||`` per key, keyed on the storage and version counter of W,
    A and B and on s: any in-place update (an optimizer step), a replaced parameter or a
    new scale recomputes it, so a cached norm is never stale. Under ``torch.compile`` the
    norm is recomputed every call (a version counter is not traceable)."""

    def __init__(self):
        self._entries: dict[object, tuple[tuple, torch.Tensor]] = {}

    def get(self, key, weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return dora_weight_norm(weight, lora_A, lora_B, scaling)
        stamp = (_stamp(weight), _stamp(lora_A), _stamp(lora_B), float(scaling))
        hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
        self._entries[key] = (stamp, norm)
        return norm

    def clear(self) -> None:
        self._entries.clear()
