"""Which linear layers fastlora computes with, recognized in one place (the PEFT reader
reads base layers and adapters with it, ``AdapterBank`` and ``fastlora.serve`` bind to the
layers it recognizes).

A layer is recognized by its class *and* its forward: a subclass that overrides the
forward computes something else, which the fused ops would bypass (fastlora's own class
swaps excepted: a swapped layer is judged by its original class).

* ``LINEAR``: an ``nn.Linear`` (or subclass) running ``nn.Linear.forward``;
* ``CONV1D``: transformers' ``Conv1D`` (GPT-2's ``[K, N]`` weight) with its own forward;
* ``BNB_4BIT``: a bitsandbytes ``Linear4bit`` (``LinearNF4`` / ``LinearFP4``) with its own
  forward, whose weight is a packed 4-bit ``Params4bit`` (its ``.weight`` is a uint8
  ``[ceil(N*K / 2), 1]`` tensor, never ``[N, K]``).

Nothing is imported to recognize a layer: transformers' ``Conv1D`` is looked up once (when
transformers is installed), bitsandbytes' class only where bitsandbytes is already loaded
(a model holding its layers has imported it).
"""
from __future__ import annotations

import functools
import sys

from torch import nn

from .swap import original_class

__all__ = ["BNB_4BIT", "CONV1D", "LINEAR", "linear_kind", "loaded_class", "quant_hint"]

LINEAR, CONV1D, BNB_4BIT = "Linear", "Conv1D", "bnb 4-bit"
_LINEAR_FORWARD = nn.Linear.forward


@functools.cache
def _conv1d():
    """transformers' ``Conv1D`` class and its forward, or (None, None) without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None, None
    return Conv1D, Conv1D.forward


def loaded_class(module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` if that module is already imported (nothing is imported
    here, so optional libraries stay optional and cost nothing where unused)."""
    return getattr(sys.modules.get(module), name, None)


def linear_kind(module: nn.Module) -> str | None:
    """``LINEAR``, ``CONV1D`` or ``BNB_4BIT`` (see the module docstring), else None. A layer
    whose class fastlora swapped (``fastlora.nn.swap``) is judged by its original class."""
    forward = original_class(module).forward
    if isinstance(module, nn.Linear) and forward is _LINEAR_FORWARD:
        return LINEAR
    conv1d, conv1d_forward = _conv1d()
    if conv1d is not None and isinstance(module, conv1d) and forward is conv1d_forward:
        return CONV1D
    bnb_4bit = loaded_class("bitsandbytes.nn.modules", "Linear4bit")
    if bnb_4bit is not None and isinstance(module, bnb_4bit) and forward is bnb_4bit.forward:
        return BNB_4BIT
    return None


_QUANT_HINTS = {"bitsandbytes": "bitsandbytes", "bnb": "bitsandbytes", "gptq": "GPTQ", "awq": "AWQ",
                "aqlm": "AQLM", "hqq": "HQQ", "eetq": "EETQ", "torchao": "torchao",
                "optimum": "optimum", "quanto": "quanto", "auto_round": "auto-round",
                "transformer_engine": "Transformer Engine", ".inc": "Intel Neural Compressor",
                "fp8": "FP8"}


def quant_hint(obj) -> str | None:
    """The quantization library an object's class comes from, guessed from its module."""
    mod = (type(obj).__module__ or "").lower() + "." + type(obj).__name__.lower()
    for key, label in _QUANT_HINTS.items():
        if key in mod:
            return label
    return None
