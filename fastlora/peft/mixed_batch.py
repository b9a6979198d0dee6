"""PEFT's ``adapter_names`` mixed batches (a different adapter per sequence) on
``fastlora.multi_lora_linear``: one pass over the base weight for all rows, in training too
(PEFT refuses that) and with DoRA adapters (PEFT refuses those), each row exactly as if its
adapter alone were active."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters import PackedAdapters, pack_adapters
from ..functional import multi_lora_linear
from .reader import Adapter, NotFused, read_adapter, read_base
from .state import cached_bank, dora_norm

_BASE = "__base__"
_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def _sequence_index(names: tuple[str, ...], slots: dict[str, int], device) -> torch.Tensor:
    """Per-sequence adapter indices on ``device``, cached (one host-to-device copy per batch
    composition, shared by all layers with the same adapters; one made under inference mode
    is not reused outside it)."""
    key = (names, tuple(slots.items()), str(device), torch.is_inference_mode_enabled())
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        hit = torch.tensor([slots.get(a, -1) for a in names], dtype=torch.int32, device=device)
        _INDEX_CACHE[key] = hit
    return hit


def _pack(layer, adapters: list[Adapter], weight, grad: bool) -> PackedAdapters:
    """The adapters packed along the rank; reused from the layer's state while their
    parameters, scales, dropout and the base weight are unchanged, unless gradients are
    needed (then packed each call, differentiably, from those in the batch)."""
    def build():
        weight_norms = [dora_norm(layer, a.name, weight, a.A, a.B, a.scale)
                        if a.magnitude is not None else None for a in adapters]
        dropout = [a.dropout_p() for a in adapters]
        with torch.set_grad_enabled(grad):
            return pack_adapters([(a.A, a.B, a.scale, a.magnitude) for a in adapters],
                                 weight=weight, weight_norms=weight_norms,
                                 dropout=dropout if any(dropout) else None)

    if grad:
        return build()
    tensors = [weight] + [t for a in adapters for t in (a.A, a.B, a.magnitude) if t is not None]
    extra = tuple((a.name, float(a.scale), a.magnitude is not None, a.dropout_p()) for a in adapters)
    return cached_bank(layer, tensors, extra, build)


def peft_mixed_batch_forward(layer, x: torch.Tensor, adapter_names: Sequence[str], *,
                             known_adapters: Sequence[str] | None = None) -> torch.Tensor:
    """PEFT ``lora.Linear`` forward with ``adapter_names`` (one name per sequence of x; x
    ``[B, ...,  K]``, ``"__base__"`` = base only), as PEFT's ``_mixed_batch_forward`` but in
    one pass over the base weight. Works in training (gradients reach each adapter's
    parameters; dropout as PEFT) and for DoRA adapters, which PEFT's mixed batch refuses.

    A name must be one of the layer's adapters, ``"__base__"``, or in ``known_adapters``
    (adapters of the model that this layer lacks: base only here, as PEFT); any other name
    raises ``ValueError``. Runs PEFT's own ``_mixed_batch_forward`` where the kernels cannot
    reproduce it: whatever ``reader`` refuses for the base or an adapter in the batch,
    ``lora_bias``, adapters of different dtypes in the batch, an input dtype other than
    the base weight's outside autocast.
    """
    names = tuple(adapter_names)
    if len(names) != len(x):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, "
                         f"but got {len(names)} and {len(x)} respectively.")
    if layer.merged:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please "
                         "call `unmerge_adapter` first.")
    if layer.disable_adapters:  # as PEFT: the base layer only
        return layer.get_base_layer()(x)
    unknown = set(names) - set(layer.lora_A.keys()) - {_BASE} - set(known_adapters or ())
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    in_batch = set(names)
    used = [a for a in layer.lora_A if a in in_batch]
    if not used:
        return layer.get_base_layer()(x)
    base = read_base(layer)
    adapters = [read_adapter(layer, a) for a in used]
    if (isinstance(base, NotFused) or any(isinstance(a, NotFused) or a.lora_bias is not None
                                          for a in adapters)
            or len({a.A.dtype for a in adapters}) != 1
            or (not torch.is_autocast_enabled(x.device.type) and x.dtype != base.weight.dtype)):
        return layer._mixed_batch_forward(x, adapter_names=list(names))
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for a in adapters for t in (a.A, a.B, a.magnitude) if t is not None)
    if not grad:  # every adapter of the layer that fits the bank: one cached bank serves any batch
        dtype = adapters[0].A.dtype
        others = (read_adapter(layer, a) for a in layer.lora_A if a not in in_batch)
        others = {a.name: a for a in others if not isinstance(a, NotFused)
                  and a.lora_bias is None and a.A.dtype == dtype}
        by_name = {a.name: a for a in adapters}
        adapters = [by_name.get(a) or others[a] for a in layer.lora_A if a in by_name or a in others]
    bank = _pack(layer, adapters, base.weight, grad)
    slots = {a.name: i for i, a in enumerate(adapters)}
    index = _sequence_index(names, slots, x.device)
    index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    return multi_lora_linear(x, base.weight, base.bias, bank, index, training=layer.training)
