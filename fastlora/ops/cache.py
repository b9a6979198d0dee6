"""Values fastlora derives from parameters and keeps (DoRA row norms, packed adapters), and
the one rule that says when a kept value is still valid.

A value is reused only while every tensor it came from is the same tensor object, over the
same storage (held by weak reference, so a freed storage is never mistaken for a new one at
the same address), with the same layout, dtype, device and version counter. That detects:

* in-place updates through autograd-visible ops: optimizer steps, ``load_state_dict`` (and
  PEFT's ``set_peft_model_state_dict``, ``load_adapter``), ``with torch.no_grad(): p.mul_(2)``;
* replaced data or parameters: ``p.data = t``, ``module.weight = nn.Parameter(...)``,
  ``model.to(...)``, ``model.half()``;
* new or different adapters (``set_adapter``, ``add_adapter``, ``delete_adapter``): values
  are kept per adapter and their tensors differ.

It cannot see writes that bypass the version counter: ``p.data.copy_(t)``, writes through
``p.numpy()`` or DLPack, collectives writing into a parameter's storage. After such a write
call ``fastlora.refresh(model)``. Two cases are handled without it: PEFT's merge / unmerge
on a patched layer (which write through ``.data``) drop the layer's values, and modules
managed by FSDP (whose unsharded parameters are refilled in place by all-gathers) keep
nothing. A value computed under ``torch.inference_mode()`` is an inference tensor, which
autograd cannot save: it is not reused outside inference mode. Under ``torch.compile``
nothing is kept (a version counter is not traceable).

A value that depends on the tensors' layout only, never on what they hold (what the PEFT
reader decides, a launch plan), is stamped without versions (``Stamped(..., values=False)``):
the same rule but for the version counter, so an in-place write (an optimizer step) keeps it.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..functional import dora_weight_norm
from .quant4 import Quant4Weight

__all__ = ["Cache", "DoraNormCache", "Refreshable", "Stamped", "refresh", "writes_visible"]


def _stamp(t: torch.Tensor, values: bool = True) -> tuple | None:
    """What identifies ``t``'s values (its layout only: ``values=False``, version None), or
    None for a tensor without a version counter."""
    if t.is_inference():
        return None
    owner = t._base if t._base is not None else t  # a fresh W.t() view still matches
    return (weakref.ref(owner), weakref.ref(t.untyped_storage()), t.storage_offset(),
            t._version if values else None, t.dtype, t.device, tuple(t.shape), t.stride())


class Stamped:
    """A value computed from ``tensors`` (and hashable ``extra`` facts such as a scale),
    valid while they are unchanged (see the module docstring); ``values=False``: a value
    that depends on their layout only (versions not compared). Holds no strong reference
    to the tensors."""

    __slots__ = ("_stamps", "_extra", "_inference", "_values", "value")

    def __init__(self, tensors, extra, value, *, values: bool = True):
        self._stamps = tuple(_stamp(t, values) for t in tensors)
        self._extra = extra
        self._inference = torch.is_inference_mode_enabled()
        self._values = values
        self.value = value

    def valid_for(self, tensors, extra) -> bool:
        if self._inference and not torch.is_inference_mode_enabled():
            return False
        if self._extra != extra or len(tensors) != len(self._stamps):
            return False
        values = self._values
        for s, t in zip(self._stamps, tensors):  # _stamp(t) compared inline: once per layer call
            if s is None or t.is_inference():
                return False
            owner = t._base if t._base is not None else t
            if (s[0]() is not owner or s[1]() is not t.untyped_storage()
                    or s[2:] != (t.storage_offset(), t._version if values else None, t.dtype,
                                 t.device, tuple(t.shape), t.stride())):
                return False
        return True


class Cache:
    """Base of every cache fastlora keeps on a module; ``fastlora.refresh`` clears them.
    Copies and pickles start empty."""

    def clear(self) -> None:
        raise NotImplementedError

    def __reduce__(self):
        return type(self), ()


class Refreshable:
    """Base of objects that keep values derived from parameters outside any module cache
    (``AdapterBank``: its DoRA norms) and recompute them in ``refresh()``."""

    def refresh(self) -> None:
        raise NotImplementedError


def writes_visible(*modules: nn.Module) -> bool:
    """False when FSDP manages one of ``modules``: its unsharded parameters are refilled by
    all-gathers that leave version counters unchanged, so nothing may be cached for them."""
    for m in modules:  # FSDP sets the flag on the instance
        if m.__dict__.get("_is_fsdp_managed_module", False):
            return False
    return True


class DoraNormCache(Cache):
    """``||W + s B A||`` per key (an adapter name), reused while W, A, B and s are unchanged."""

    def __init__(self):
        self._entries: dict[object, Stamped] = {}

    def get(self, key, weight, lora_A, lora_B, scaling: float, *, keep: bool = True
            ) -> torch.Tensor:
        """The detached fp32 row norm ``[N]``; ``keep=False`` computes it without caching."""
        if not keep or torch.compiler.is_compiling():
            return dora_weight_norm(weight, lora_A, lora_B, scaling)
        # a 4-bit weight's values: its packed codes and every tensor of its scales
        w = tuple(weight.tensors().values()) if isinstance(weight, Quant4Weight) else (weight,)
        tensors = (*w, lora_A, lora_B)
        hit = self._entries.get(key)
        if hit is not None and hit.valid_for(tensors, float(scaling)):
            return hit.value
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
        self._entries[key] = Stamped(tensors, float(scaling), norm)
        return norm

    def clear(self) -> None:
        self._entries.clear()


def refresh(*objects) -> None:
    """Drop every value fastlora derived from the parameters of ``objects`` (models or
    modules: patched PEFT layers, ``fastlora.nn.DoraLinear``; or ``AdapterBank``s, whose
    DoRA norms are recomputed). Needed only after writes the version counter cannot see,
    such as ``p.data.copy_(t)``; the next forward recomputes what it needs."""
    for obj in objects:
        if isinstance(obj, Refreshable):
            obj.refresh()
        elif isinstance(obj, nn.Module):
            for module in obj.modules():
                for value in list(vars(module).values()):
                    if isinstance(value, Cache):
                        value.clear()
        else:
            raise TypeError(f"fastlora.refresh takes modules or AdapterBanks, got {type(obj).__name__}")
