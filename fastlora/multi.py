"""Multi-adapter (gathered) batches: the ``torch.library`` custom ops with autograd behind
``fastlora.multi_lora_linear`` (in ``fastlora.functional``; adapters packed as in
``fastlora.adapters``), and the PEFT mixed-batch forward.

Row i of x (leading dims flattened) gets ``y_i = x_i W^T + bias + s_a x_i A_a^T B_a^T``
for its adapter ``a = adapter_index[i]`` (DoRA adapters: ``g_a * (x_i W^T + s_a x_i A_a^T
B_a^T) + bias``, ``g_a = m_a / ||W + s_a B_a A_a||`` with the norm detached); ``-1`` means
the base layer only.

The Triton path (see ``fastlora.kernels.multi_meta``): rows grouped by adapter on the
device (stable argsort + searchsorted: no host sync, static grids, CUDA-graph safe), a
shrink over segment tiles, the base GEMM over all rows with each tile's adapters added
in its prologue, and a backward giving dx and every adapter's own dA, dB (and DoRA
magnitude) gradient. Per-adapter dropout probabilities and the dropout seed are device
tensors the kernels load.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import PackedAdapters, pack_adapters
from .functional import multi_lora_linear

__all__ = ["PackedAdapters", "multi_lora_linear", "pack_adapters", "peft_mixed_batch_forward"]


# ---------------------------------------------------------------- custom ops
# (the kernels are imported on first use, as fastlora.functional does: importing fastlora
# loads neither Triton nor the kernels)


def _groups(perm, keys, seg, n):
    from .kernels.multi_meta import RowGroups

    return RowGroups(perm, keys, seg, n)


@torch.library.custom_op("fastlora::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                   scales: torch.Tensor, g: torch.Tensor | None, dora_flags: torch.Tensor | None,
                   dropout: torch.Tensor | None, perm: torch.Tensor, keys: torch.Tensor,
                   seg: torch.Tensor, max_rank: int, seed: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``; returns y ``[M, N]`` (x's dtype) and S ``[M, max_rank]`` fp32 (sorted
    rows: the scaled shrink). g ``[n, N]`` fp32 (DoRA), dropout ``[n]`` fp32 or None."""
    from .kernels.multi_linear import MultiLowRank, multi_fused_linear
    from .kernels.multi_shrink import multi_lora_shrink

    groups = _groups(perm, keys, seg, offsets.shape[0])
    s = multi_lora_shrink(x, A, offsets, ranks, scales, max_rank, groups, dropout, seed)
    y = multi_fused_linear(x, weight.t(), MultiLowRank(s, B, offsets, ranks, groups), bias,
                           g_out=g)
    return y, s


@multi_lora_fwd.register_fake
def _(x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg,
      max_rank, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], max(max_rank, 1)), dtype=torch.float32))


@torch.library.custom_op("fastlora::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                   offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                   g: torch.Tensor | None, dora_flags: torch.Tensor | None,
                   dropout: torch.Tensor | None, perm: torch.Tensor, keys: torch.Tensor,
                   seg: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None,
                   seed: torch.Tensor | None, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx or empty, packed dA ``[S, K]``, packed dB^T ``[S, N]``, dg ``[n, N]`` fp32
    or empty); rows of adapters absent from the batch get zeros. y: the forward's output
    (DoRA only)."""
    from .kernels.backward import DoraBackward
    from .kernels.multi_backward import multi_lora_da, multi_lora_dy
    from .kernels.multi_linear import MultiLowRank, multi_fused_linear

    groups = _groups(perm, keys, seg, offsets.shape[0])
    dora = DoraBackward(g, y, bias) if g is not None else None
    out = multi_lora_dy(dy, B, s, offsets, ranks, scales, groups, dora, dora_flags)
    ds, db = out[:2]
    da = multi_lora_da(ds, x, offsets, ranks, A.shape[0], A.dtype, groups, dropout, seed)
    if need_dx:
        low = MultiLowRank(ds, A, offsets, ranks, groups, dropout, seed)
        dx = multi_fused_linear(dy, weight, low, out_dtype=x.dtype, g_in=g)
    else:
        dx = x.new_empty((0,))
    dg = out[2] / g if g is not None else x.new_empty((0,), dtype=torch.float32)
    return dx, da.to(A.dtype), db.to(B.dtype), dg


@multi_lora_bwd.register_fake
def _(dy, x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys,
      seg, s, y, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dg = torch.empty_like(g) if g is not None else x.new_empty((0,), dtype=torch.float32)
    return dx, torch.empty_like(A), torch.empty_like(B), dg


def _setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg,
     _, seed) = inputs
    ctx.save_for_backward(x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout,
                          perm, keys, seg, output[1], output[0] if g is not None else None, seed)


def _backward(ctx, dy, _ds):
    (x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg, s,
     y, seed) = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    need_g = ctx.needs_input_grad[8]
    dx = da = db = dg = dweight = dbias = None
    if need_x or need_a or need_bb or need_g:
        dx, da, db, dg = multi_lora_bwd(dy, x, weight, bias, A, B, offsets, ranks, scales, g,
                                        dora_flags, dropout, perm, keys, seg, s, y, seed, need_x)
    if need_w:  # a trainable base weight is unusual: plain PyTorch, no fusion
        dyw = dy.float()
        if g is not None:  # DoRA rows: the gradient of g_a * x W^T
            g_rows = torch.cat([g, g.new_ones((1, g.shape[1]))])
            dyw = dyw * g_rows[torch.empty_like(keys).scatter_(0, perm, keys).long()]
        dweight = (dyw.t() @ x.float()).to(weight.dtype)
    if need_b:
        dbias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, None, None, (dg if need_g else None),
            None, None, None, None, None, None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- PEFT layers


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


def _peft_weight(layer):
    """The base weight as ``[N, K]`` (a Conv1D's transposed view), or None if unsupported."""
    base = layer.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks:
        return None, base
    if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
        return base.weight, base
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None, base
    if isinstance(base, Conv1D):
        return base.weight.t(), base
    return None, base


def _peft_adapter(layer, name: str):
    """(lora_A, lora_B, scale, magnitude or None, dropout p), or None if the kernels cannot
    reproduce PEFT for this adapter (a LoRA variant other than DoRA, lora_bias, a dropout
    module other than nn.Dropout / nn.Identity)."""
    variant = layer.lora_variant.get(name) if hasattr(layer, "lora_variant") else None
    dora = name in getattr(layer, "lora_magnitude_vector", {})
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
        return None
    if layer.lora_B[name].bias is not None:
        return None
    drop = layer.lora_dropout[name]
    if type(drop) is nn.Dropout:
        p = drop.p if drop.training else 0.0
    elif type(drop) is nn.Identity:
        p = 0.0
    else:
        return None
    magnitude = layer.lora_magnitude_vector[name].weight if dora else None
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], magnitude, p


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
    from .dora_cache import DoraNormCache

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
