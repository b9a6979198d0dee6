"""The class swap of ``fastlora.patch`` (``fastlora.nn.swap.ClassSwap``): each patched PEFT class
gets a cached subclass overriding a few methods.

The subclass keeps PEFT's class name (``repr`` still says ``lora.Linear(...)``) and pickles
as the original class; ``swap`` / ``restore`` change a module's ``__class__`` and create /
remove its per-layer state, nothing else.
"""
from __future__ import annotations

import contextlib
import copyreg

from torch import nn

from ..nn.swap import ClassSwap
from . import state
from .forward import fused_forward
from .mixed_batch import routing_hooks


def _reduce_ex(self, protocol):
    """Pickle/deepcopy a patched module by its original class, not the generated one
    (which exists only once ``patch`` ran): ``_new_patched`` recreates it on load."""
    rv = object.__reduce_ex__(self, protocol)
    cls = type(self)
    if not (isinstance(rv, tuple) and len(rv) >= 2 and rv[1] and rv[1][0] is cls):
        return rv
    if rv[0] is copyreg.__newobj__:
        args = tuple(rv[1][1:])
    elif rv[0] is copyreg._reconstructor:  # protocols 0 and 1
        args = ()
    else:
        return rv
    return (_new_patched, (cls._fastlora_original_class, *args)) + tuple(rv[2:])


def _new_patched(original_class: type, *args):
    cls = patched_class(original_class)
    return cls.__new__(cls, *args)


@contextlib.contextmanager
def _tuner_forward_hooks(self, *args, **kwargs):
    """PEFT's context that routes ``adapter_names`` to the layers (pre-forward hooks), with
    three changes. The patched layers get the batch's routing, made once per name list for
    the whole call (``mixed_batch.routing_hooks``), instead of the names. PEFT removes its
    hooks after its ``yield`` with no ``finally``, so a forward that raises would leave them
    installed and every later call would run the stale adapter mix: here PEFT's context is
    always exited as if its body had succeeded (which removes them), then the error
    propagates. And PEFT refuses ``adapter_names`` in training mode (its layers cannot train
    a mixed batch); the patched layers can, so in training PEFT's checks run with the tuner
    object (only it) flagged as in eval."""
    original = type(self)._fastlora_original_class._enable_peft_forward_hooks
    hooks = original(self, *args, **kwargs)
    mixed = kwargs.get("adapter_names") is not None
    training = self.training and mixed
    if training:
        self.training = False
    try:
        hooks.__enter__()
    finally:
        if training:
            self.training = True
    routed = []
    try:
        if mixed:
            layers = [m for m in self.modules() if is_patched(m) and not _is_tuner(type(m))]
            routed = routing_hooks(self, layers)
        yield
    finally:
        for handle in routed:
            handle.remove()
        hooks.__exit__(None, None, None)


def _merge(self, *args, **kwargs):
    """PEFT's ``merge``, then the layer's caches dropped: PEFT writes the base weight
    through ``.data``, which version counters do not see."""
    try:
        return type(self)._fastlora_original_class.merge(self, *args, **kwargs)
    finally:
        state.clear(self)


def _unmerge(self, *args, **kwargs):
    """PEFT's ``unmerge``, then the layer's caches dropped (as ``_merge``)."""
    try:
        return type(self)._fastlora_original_class.unmerge(self, *args, **kwargs)
    finally:
        state.clear(self)


_LAYER_METHODS = {"forward": fused_forward, "merge": _merge, "unmerge": _unmerge}
_TUNER_METHODS = {"_enable_peft_forward_hooks": _tuner_forward_hooks}


def _is_tuner(cls: type) -> bool:
    return hasattr(cls, "_enable_peft_forward_hooks")


def _methods(original: type) -> dict:
    return {**(_TUNER_METHODS if _is_tuner(original) else _LAYER_METHODS),
            "__reduce_ex__": _reduce_ex}


def _describe(original: type) -> str:
    methods = _TUNER_METHODS if _is_tuner(original) else _LAYER_METHODS
    return (f"{original.__module__}.{original.__qualname__} with {', '.join(methods)} from "
            "fastlora (fastlora.patch); everything else is PEFT's.")


_SWAP = ClassSwap(_methods, _describe, __name__)


def patched_class(original: type) -> type:
    """The cached subclass of a PEFT LoRA layer class (``forward`` fused) or of a LoRA tuner
    class (mixed batches in training), named as the original."""
    return _SWAP.subclass(original)


def is_patched(module: nn.Module) -> bool:
    """True when ``module``'s class is one ``fastlora.patch`` installed."""
    return _SWAP.owns(module)


def swap(module: nn.Module) -> None:
    """Give ``module`` its patched class (and a LoRA layer its state)."""
    _SWAP.swap(module)
    if not _is_tuner(type(module)):
        state.attach(module)


def restore(module: nn.Module) -> None:
    """Give ``module`` back its PEFT class and remove everything ``swap`` added."""
    _SWAP.restore(module)
    state.detach(module)
