"""PEFT's ``adapter_names`` mixed batches on ``fastlora.multi_lora_linear``."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..multi import PackedAdapters, multi_lora_linear, pack_adapters
from .reader import _peft_adapter, _peft_weight


def _stamp(t: torch.Tensor) -> tuple:
    return (id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device)


_BASE = "__base__"
_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def _sequence_index(names: tuple[str, ...], slots: dict[str, int], device) -> torch.Tensor:
    """Per-sequence adapter indices on ``device``, cached (one host-to-device copy per batch
    composition, shared by all layers with the same adapters)."""
    key = (names, tuple(slots.items()), str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        hit = torch.tensor([slots.get(a, -1) for a in names], dtype=torch.int32, device=device)
        _INDEX_CACHE[key] = hit
    return hit



def _peft_bank(layer, names: list[str], weight, grad: bool) -> PackedAdapters | None:
    """The layer's adapters ``names`` packed; cached while their parameters, scalings and the
    base weight are unchanged (parameter identity, storage and version counters) unless
    gradients are needed (then packed each call, differentiably, from those in the batch)."""
    parts = []
    for a in names:
        part = _peft_adapter(layer, a)
        if part is None:
            return None
        parts.append(part)
    if len({p[0].dtype for p in parts} | {p[1].dtype for p in parts}) != 1:
        return None
    # the entry keeps the stamped tensors alive, so their ids and storages are not recycled
    refs = [layer.get_base_layer().weight] + [t for A, B, _, m, _ in parts for t in (A, B, m)
                                              if t is not None]
    stamp = (tuple(names), tuple(_stamp(t) for t in refs), tuple(
        (float(s), m is not None, p) for _, _, s, m, p in parts))
    cached = getattr(layer, "_fastlora_multi_bank", None)
    if not grad and cached is not None and cached[0] == stamp:
        return cached[1]
    from ..dora_cache import DoraNormCache

    norms = getattr(layer, "_fastlora_multi_norms", None)
    if norms is None:
        norms = layer._fastlora_multi_norms = DoraNormCache()
    weight_norms = [norms.get(a, weight, A, B, s) if m is not None else None
                    for a, (A, B, s, m, p) in zip(names, parts)]
    dropout = [p for *_, p in parts]
    with torch.set_grad_enabled(grad):
        bank = pack_adapters([part[:4] for part in parts], weight=weight, weight_norms=weight_norms,
                             dropout=dropout if any(dropout) else None)
    if not grad:
        layer._fastlora_multi_bank = (stamp, bank, refs)
    return bank


def peft_mixed_batch_forward(layer, x: torch.Tensor, adapter_names: Sequence[str], *,
                             known_adapters: Sequence[str] | None = None) -> torch.Tensor:
    """PEFT ``lora.Linear`` forward with ``adapter_names`` (one name per sequence of x; x
    ``[B, ...,  K]``, ``"__base__"`` = base only), as PEFT's ``_mixed_batch_forward`` but in
    one pass over the base weight. Works in training (gradients reach each adapter's
    parameters; dropout as PEFT) and for DoRA adapters, which PEFT's mixed batch refuses.

    A name must be one of the layer's adapters, ``"__base__"``, or in ``known_adapters``
    (adapters of the model that this layer lacks: base only here, as PEFT); any other name
    raises ``ValueError``. Falls back to PEFT's own ``_mixed_batch_forward`` where the
    kernels cannot reproduce it (a non-Linear/Conv1D or hooked base, LoRA variants other
    than DoRA, lora_bias, mixed adapter dtypes, custom dropout modules).
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
    own = set(layer.lora_A.keys())
    unknown = set(names) - own - {_BASE} - set(known_adapters or ())
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    weight, base = _peft_weight(layer)
    used = [a for a in layer.lora_A if a in set(names)]
    if not used and weight is not None:
        return base(x)
    params = [p for a in used for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
    params += [layer.lora_magnitude_vector[a].weight for a in used
               if a in getattr(layer, "lora_magnitude_vector", {})]
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    # inference: every adapter of the layer, so the cached bank serves any batch
    slot_names = used if grad else list(layer.lora_A.keys())
    bank = _peft_bank(layer, slot_names, weight, grad) if weight is not None else None
    if bank is None and weight is not None and not grad:  # an unsupported adapter not in the batch
        slot_names = used
        bank = _peft_bank(layer, used, weight, grad)
    if bank is None or (not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype):
        return layer._mixed_batch_forward(x, adapter_names=list(names))
    slots = {a: i for i, a in enumerate(slot_names)}
    index = _sequence_index(names, slots, x.device)
    index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    return multi_lora_linear(x, weight, base.bias, bank, index, training=layer.training)
