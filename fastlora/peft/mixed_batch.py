"""PEFT's ``adapter_names`` mixed batches (a different adapter per sequence) on
``fastlora.multi_lora_linear``: one pass over the base weight for all rows, in training too
(PEFT refuses that) and with DoRA adapters (PEFT refuses those), each row exactly as if its
adapter alone were active.

The batch's ``fastlora.adapters.routing.Routing`` is made once per model call, not per layer: the
patched tuner's ``adapter_names`` context (``classes``) adds ``routing_hooks`` after PEFT's
own hooks, which turn the names PEFT hands each patched layer into one routing per name list
and device, shared by every layer (its row grouping made once per row count). Slots follow
the model's adapters in the tuner's ``peft_config`` order; each layer packs its adapters in
that order, rank 0 for those it lacks (the base only there, as PEFT).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters.packed import PackedAdapters, pack_adapters
from ..functional import multi_lora_linear
from ..adapters.routing import BASE, Routing
from .reader import BNB_4BIT, Adapter, NotFused, read_adapter, read_base
from .state import cached_bank, dora_norm


def batch_routing(names: Sequence[str], slot_names: tuple[str, ...], device) -> Routing:
    """The routing of per-sequence ``names`` over slots ``slot_names`` (``"__base__"``: -1)."""
    slots = {a: i for i, a in enumerate(slot_names)}
    return Routing.from_names(names, slots.__getitem__, len(slot_names), device,
                              slot_names=slot_names)


def routing_hooks(tuner, layers) -> list:
    """Forward pre-hooks on the patched LoRA ``layers`` (run after PEFT's, which pass them
    ``adapter_names``) giving them one routing per name list and device instead; returns
    their handles. The routings live as long as the hooks (one model call or generate)."""
    slot_names = tuple(tuner.peft_config)
    made: dict[tuple, tuple[list, Routing]] = {}

    def hook(module, args, kwargs):
        names = kwargs.get("adapter_names")
        if names is None or isinstance(names, Routing) or not args:
            return None
        device = args[0].device
        hit = made.get((id(names), device))
        if hit is None or hit[0] is not names:  # the list is held: its id is not reused
            hit = made[id(names), device] = (names, batch_routing(names, slot_names, device))
        kwargs["adapter_names"] = hit[1]
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]


def _pack(layer, slot_names: tuple[str, ...], adapters: dict[str, Adapter], weight,
          grad: bool) -> PackedAdapters:
    """The layer's adapters packed along the rank in slot order (rank 0 for slots it lacks);
    reused from the layer's state while their parameters, scales, dropout and the base
    weight are unchanged, unless gradients are needed (then packed each call, differentiably,
    from those in the batch only)."""
    if not grad:  # every adapter of the layer that fits: one cached bank serves any batch
        dtype = next(iter(adapters.values())).A.dtype
        for name in layer.lora_A:
            if name not in adapters and name in slot_names:
                a = read_adapter(layer, name)
                if not isinstance(a, NotFused) and a.lora_bias is None and a.A.dtype == dtype:
                    adapters[name] = a
    entries = [adapters.get(name) for name in slot_names]
    first = next(a for a in entries if a is not None)
    empty = (first.A.new_zeros((0, first.A.shape[1])), first.B.new_zeros((first.B.shape[0], 0)),
             0.0, None)

    def build():
        weight_norms = [dora_norm(layer, a.name, weight, a.A, a.B, a.scale)
                        if a is not None and a.magnitude is not None else None for a in entries]
        dropout = [a.dropout_p() if a is not None else 0.0 for a in entries]
        with torch.set_grad_enabled(grad):
            return pack_adapters([(a.A, a.B, a.scale, a.magnitude) if a is not None else empty
                                  for a in entries],
                                 weight=weight, weight_norms=weight_norms,
                                 dropout=dropout if any(dropout) else None)

    if grad:
        return build()
    tensors = [weight] + [t for a in entries if a is not None
                          for t in (a.A, a.B, a.magnitude) if t is not None]
    extra = (slot_names,) + tuple(
        (float(a.scale), a.magnitude is not None, a.dropout_p()) if a is not None else None
        for a in entries)
    return cached_bank(layer, tensors, extra, build)


def peft_mixed_batch_forward(layer, x: torch.Tensor, adapter_names, *,
                             known_adapters: Sequence[str] | None = None) -> torch.Tensor:
    """PEFT ``lora.Linear`` forward with ``adapter_names`` (one name per sequence of x; x
    ``[B, ...,  K]``, ``"__base__"`` = base only), as PEFT's ``_mixed_batch_forward`` but in
    one pass over the base weight. Works in training (gradients reach each adapter's
    parameters; dropout as PEFT) and for DoRA adapters, which PEFT's mixed batch refuses.

    ``adapter_names``: the names, or the batch's ``Routing`` (``routing_hooks``; its names
    were checked by PEFT's model-level hook). A name must be one of the layer's adapters,
    ``"__base__"``, or in ``known_adapters`` (adapters of the model that this layer lacks:
    base only here, as PEFT); any other name raises ``ValueError``. Runs PEFT's own
    ``_mixed_batch_forward`` where the kernels cannot reproduce it: whatever ``reader``
    refuses for the base or an adapter in the batch, ``lora_bias``, adapters of different
    dtypes in the batch, an input dtype other than the base weight's outside autocast.
    """
    routing = adapter_names if isinstance(adapter_names, Routing) else None
    names = routing.names if routing is not None else tuple(adapter_names)
    if len(names) != len(x):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, "
                         f"but got {len(names)} and {len(x)} respectively.")
    if layer.merged:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please "
                         "call `unmerge_adapter` first.")
    if layer.disable_adapters:  # as PEFT: the base layer only
        return layer.get_base_layer()(x)
    if routing is None:
        unknown = set(names) - set(layer.lora_A.keys()) - {BASE} - set(known_adapters or ())
        if unknown:
            raise ValueError("Trying to infer with non-existing adapter(s): "
                             f"{', '.join(sorted(unknown))}")
        slot_names = tuple(dict.fromkeys([*layer.lora_A, *(a for a in names if a != BASE)]))
        routing = batch_routing(names, slot_names, x.device)
    present = routing.present
    used = [a for a in layer.lora_A if a in present]
    if not used:
        return layer.get_base_layer()(x)
    base = read_base(layer)
    adapters = {a: read_adapter(layer, a) for a in used}
    # a bitsandbytes 4-bit base: multi_lora_linear takes dense weights only (PEFT's loop runs)
    if (isinstance(base, NotFused) or base.kind == BNB_4BIT
            or any(isinstance(a, NotFused) or a.lora_bias is not None for a in adapters.values())
            or len({a.A.dtype for a in adapters.values()}) != 1
            or (not torch.is_autocast_enabled(x.device.type) and x.dtype != base.weight.dtype)):
        return layer._mixed_batch_forward(x, adapter_names=list(names))
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for a in adapters.values() for t in (a.A, a.B, a.magnitude) if t is not None)
    bank = _pack(layer, routing.slot_names, adapters, base.weight, grad)
    return multi_lora_linear(x, base.weight, base.bias, bank, routing, training=layer.training)
