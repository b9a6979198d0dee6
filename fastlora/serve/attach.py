"""``attach(model, bank)``: a plain model's linear layers take their adapters from an
``AdapterBank``, per row, from the routing of the batch in flight.

Each ``nn.Linear`` (or transformers ``Conv1D``) of the bank's model gets its ``__class__``
swapped (``fastlora.nn.swap``) for a cached subclass (named as the original) whose ``forward`` reads the routing
that ``routed(routing)`` makes current (a context variable: no argument threads through the
model's own code) and calls ``fastlora.multi_lora_linear`` with the layer's adapters (through
the layer's launch plans, ``fastlora.choice.plans.MultiPlans``); with no routing, or no adapter covering the layer, it is the original forward. Parameters, buffers,
hooks and state_dict keys stay as they were; ``detach`` gives the classes back. Modules whose
forward was replaced on the instance (which a class swap cannot reach) and PEFT LoRA layers
(serve the base model, or use ``fastlora.patch`` and ``adapter_names``) are refused.
"""
from __future__ import annotations

import contextlib
import contextvars

from torch import nn

from ..adapters.bank import AdapterBank, layer_weight
from ..adapters.routing import Routing
from ..nn.swap import ClassSwap

__all__ = ["attach", "detach", "is_attached", "routed"]

_ROUTING: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("fastlora_routing",
                                                                          default=None)
_ATTR = "_fastlora_serve"  # the layer's (bank, module name), in the instance __dict__


@contextlib.contextmanager
def routed(routing: Routing | None):
    """Make ``routing`` the batch's routing for attached layers inside the block (None: the
    base model)."""
    token = _ROUTING.set(routing)
    try:
        yield routing
    finally:
        _ROUTING.reset(token)


def _forward(self, x):
    """The original forward, plus each row's adapter from the current routing."""
    bank, name = self.__dict__[_ATTR]
    routing = _ROUTING.get()
    layer = bank.layers.get(name) if routing is not None else None
    original = type(self)._fastlora_original_class.forward
    if layer is None or not layer.live:
        return original(self, x)
    return layer.plans(x, layer.weight, self.bias, layer, routing)


def _describe(original: type) -> str:
    return (f"{original.__module__}.{original.__qualname__} whose rows take their adapters "
            "from an AdapterBank (fastlora.serve.attach)")


_SWAP = ClassSwap(lambda original: {"forward": _forward}, _describe, __name__)


def is_attached(module: nn.Module) -> bool:
    return _SWAP.owns(module)


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's linear layers an adapter can bind to, or an error saying why not."""
    out = []
    for name, module in model.named_modules():
        if hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
            raise ValueError(f"fastlora.serve.attach: {name!r} is a PEFT LoRA layer; attach to the "
                             "base model (or use fastlora.patch(model) with adapter_names)")
        if is_attached(module) or layer_weight(module) is None:
            continue
        if "forward" in module.__dict__:
            raise ValueError(f"fastlora.serve.attach: {name!r} has its forward replaced on the "
                             "instance, which a class swap cannot route")
        out.append((name, module))
    return out


def attach(model: nn.Module, bank: AdapterBank) -> list[str]:
    """Route every linear layer of ``model`` (the bank's model) through ``bank``; returns
    the names of the layers attached now. Attaching again is a no-op for attached layers."""
    if bank.model is not model:
        raise ValueError("fastlora.serve.attach: the bank was made for another model "
                         "(AdapterBank(model) binds adapters to that model's modules)")
    targets = _targets(model)
    for name, module in targets:
        module.__dict__[_ATTR] = (bank, name)
        _SWAP.swap(module)
    return [name for name, _ in targets]


def detach(model: nn.Module) -> list[str]:
    """Give every attached layer of ``model`` its class back; returns their names."""
    done = []
    for name, module in model.named_modules():
        if is_attached(module):
            _SWAP.restore(module)
            module.__dict__.pop(_ATTR, None)
            done.append(name)
    return done
