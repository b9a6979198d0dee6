"""``pack_adapters``: the adapters of one base layer packed for ``multi_lora_linear``, as a
``PackedAdapters``.

Adapters are packed along the rank, not padded to the largest one: adapter i owns rows
``offsets[i] .. offsets[i] + ranks[i]`` of ``A [S, K]`` (its ``lora_A``) and of
``B [S, N]`` (its ``lora_B`` transposed), so memory and kernel work follow the real ranks.
Everything a forward reads per adapter (offsets, ranks, scales, DoRA flags and norms,
dropout probabilities) is a tensor on the adapters' device, so a call copies nothing from
the host and can be captured in a CUDA graph. ``PackedAdapters`` is defined (and checked)
beside the kernels that read it (``fastlora.kernels.multi_meta``) and re-exported here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops import checks
from ..functional import dora_weight_norm
from ..kernels.multi_meta import PackedAdapters

__all__ = ["PackedAdapters", "pack_adapters"]


def pack_adapters(adapters: Sequence[tuple], *, weight: torch.Tensor | None = None,
                  weight_norms: Sequence[torch.Tensor | None] | None = None,
                  dropout: Sequence[float] | None = None, max_rank: int | None = None
                  ) -> PackedAdapters:
    """Pack ``(lora_A [r, K], lora_B [N, r], scale, magnitude [N] or None)`` per adapter.

    Differentiable (``torch.cat``): gradients reach the given tensors. DoRA norms come
    from ``weight_norms[i]`` or are computed from ``weight`` ``[N, K]``. ``dropout``: per-adapter
    probabilities (host floats) for training, copied to the device once here (all zero:
    no dropout); ``max_rank``: default the largest rank.
    """
    if not adapters:
        raise ValueError("pack_adapters needs at least one adapter")
    ranks = [a[0].shape[0] for a in adapters]
    offsets = [sum(ranks[:i]) for i in range(len(ranks))]
    device = adapters[0][0].device
    dora = [len(a) > 3 and a[3] is not None for a in adapters]
    if dropout is not None:
        dropout = [float(p) for p in dropout]
        if len(dropout) != len(adapters) or not all(0.0 <= p < 1.0 for p in dropout):
            raise ValueError(f"pack_adapters: dropout must hold {len(adapters)} probabilities "
                             f"in [0, 1), got {dropout}")
    drops = dropout is not None and any(p > 0.0 for p in dropout)
    for i, a in enumerate(adapters):
        checks.check_scaling(a[2], f"pack_adapters: adapter {i}'s scale")
    magnitude = norm = is_dora = None
    if any(dora):
        n_out = adapters[0][1].shape[0]
        ones = torch.ones(n_out, dtype=torch.float32, device=device)
        norms = []
        for i, (lora_A, lora_B, scale, *_) in enumerate(adapters):
            if not dora[i]:
                norms.append(ones)
            elif weight_norms is not None and weight_norms[i] is not None:
                checks.check_weight_norm(weight_norms[i], n_out, f"pack_adapters: weight_norms[{i}]")
                norms.append(weight_norms[i].detach().float())
            elif weight is None:
                raise ValueError("pack_adapters: DoRA adapters need weight or weight_norms")
            else:
                norms.append(dora_weight_norm(weight, lora_A, lora_B, scale))
        mag_dtype = next(a[3].dtype for a, d in zip(adapters, dora) if d)
        magnitude = torch.stack([a[3] if d else ones.to(mag_dtype) for a, d in zip(adapters, dora)])
        norm = torch.stack(norms)
        is_dora = torch.tensor(dora, device=device)
    return PackedAdapters(
        A=torch.cat([a[0] for a in adapters]), B=torch.cat([a[1].t() for a in adapters]),
        offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        scales=torch.tensor([float(a[2]) for a in adapters], dtype=torch.float32, device=device),
        max_rank=max(ranks) if max_rank is None else max_rank,
        magnitude=magnitude, weight_norm=norm, is_dora=is_dora,
        dropout=torch.tensor(dropout, dtype=torch.float32, device=device) if drops else None,
        dora_dropout=drops and any(d and p > 0.0 for d, p in zip(dora, dropout)))
