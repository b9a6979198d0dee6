"""The class swap behind ``fastlora.patch`` (PEFT layers) and ``fastlora.serve.attach``
(linear layers): a module's ``__class__`` becomes a cached subclass of its class that
overrides a few methods; giving the original class back undoes it.

The subclass keeps the original's name and qualified name (``repr`` and error messages
unchanged) and knows it (``_fastlora_original_class``): ``original_class`` sees through
any swap, so a swapped layer is still recognized for what it is (``fastlora.nn.layers``).
Parameters, buffers, hooks and the instance ``__dict__`` are untouched.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["ClassSwap", "original_class"]

ORIGINAL = "_fastlora_original_class"


def original_class(module: nn.Module) -> type:
    """``module``'s class before any fastlora class swap (its class if none)."""
    cls = type(module)
    return cls.__dict__.get(ORIGINAL, cls)


class ClassSwap:
    """One kind of swap: ``methods(original)`` gives the methods a swapped class overrides,
    ``describe(original)`` its docstring, ``module`` the module it claims to live in."""

    def __init__(self, methods: Callable[[type], dict], describe: Callable[[type], str],
                 module: str):
        self._methods, self._describe, self._module = methods, describe, module
        self._classes: dict[type, type] = {}  # original class -> swapped subclass

    def subclass(self, original: type) -> type:
        """The cached subclass of ``original``, named as it."""
        cls = self._classes.get(original)
        if cls is None:
            cls = type(original.__name__, (original,), {
                **self._methods(original), "__module__": self._module,
                "__qualname__": original.__qualname__, "__doc__": self._describe(original),
                ORIGINAL: original})
            self._classes[original] = cls
        return cls

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module``'s class is one this swap installed."""
        cls = type(module)
        return self._classes.get(cls.__dict__.get(ORIGINAL)) is cls

    def swap(self, module: nn.Module) -> None:
        module.__class__ = self.subclass(type(module))

    @staticmethod
    def restore(module: nn.Module) -> None:
        module.__class__ = original_class(module)
