"""The class swap: each patched PEFT class gets a cached subclass that overrides one method."""
from __future__ import annotations

import contextlib
import copyreg

from torch import nn

from .forward import _fast_forward


def _reduce_ex(self, protocol):
    """Pickle/deepcopy a patched layer by its original class, not the generated one
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
    cls = _patched_class(original_class)
    return cls.__new__(cls, *args)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original_class: type) -> type:
    """The cached subclass of a PEFT LoRA layer class (``forward`` fused) or of a LoRA
    tuner class (``_enable_peft_forward_hooks`` taking mixed batches in training too)."""
    cls = _PATCHED_CLASSES.get(original_class)
    if cls is None:
        name = f"FastLora{original_class.__name__}"
        tuner = hasattr(original_class, "_enable_peft_forward_hooks")
        override = ({"_enable_peft_forward_hooks": _tuner_forward_hooks} if tuner
                    else {"forward": _fast_forward})
        cls = type(name, (original_class,), {
            **override,
            "__reduce_ex__": _reduce_ex,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{original_class.__qualname__} with {next(iter(override))} from "
                       "fastlora (fastlora.patch); everything else is PEFT's.",
            "_fastlora_original_class": original_class,
        })
        _PATCHED_CLASSES[original_class] = cls
    return cls


def _tuner_forward_hooks(self, *args, **kwargs):
    """PEFT's context that routes ``adapter_names`` to the layers refuses them in training
    mode (PEFT's layers cannot train a mixed batch); the patched layers can, so in
    training PEFT's checks run with the tuner object (only it) flagged as in eval."""
    original = type(self)._fastlora_original_class._enable_peft_forward_hooks
    if kwargs.get("adapter_names") is None or not self.training:
        return original(self, *args, **kwargs)
    return _training_mixed_batch(self, original(self, *args, **kwargs))


@contextlib.contextmanager
def _training_mixed_batch(tuner: nn.Module, hooks):
    with contextlib.ExitStack() as stack:
        tuner.training = False
        try:
            stack.enter_context(hooks)
        finally:
            tuner.training = True
        yield


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` is a LoRA layer patched by ``fastlora.patch``."""
    return type(module) in _PATCHED_CLASSES.values()

