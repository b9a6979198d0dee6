"""``PackedAdapters``: the adapters of one base layer packed for ``multi_lora_linear``.

Adapters are packed along the rank, not padded to the largest one: adapter i owns rows
``offsets[i] .. offsets[i] + ranks[i]`` of ``A [S, K]`` (its ``lora_A``) and of
``B [S, N]`` (its ``lora_B`` transposed), so memory and kernel work follow the real ranks.
Everything a forward reads per adapter (offsets, ranks, scales, DoRA flags and norms,
dropout probabilities) is a tensor on the adapters' device, so a call copies nothing from
the host and can be captured in a CUDA graph.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..ops import checks
from ..functional import dora_weight_norm
from .routing import Slots

__all__ = ["PackedAdapters", "pack_adapters"]


@dataclass(frozen=True, eq=False)
class PackedAdapters:
    """n adapters of one base layer (weight ``[N, K]``), packed along the rank.

    A ``[S, K]``, B ``[S, N]`` (lora_B transposed), same float dtype; offsets, ranks
    ``[n]`` int32 (rank 0: the adapter adds nothing to this layer); scales ``[n]`` fp32;
    ``max_rank`` >= every rank (static: it sizes a ``[M, max_rank]`` fp32 buffer). DoRA:
    magnitude ``[n, N]``, weight_norm ``[n, N]`` fp32 (the detached ``||W + s B A||``; 1 in
    rows of plain adapters) and is_dora ``[n]`` bool, all three or none. dropout: ``[n]``
    fp32 probabilities applied in training, or None (no dropout). ``dora_dropout``: a host
    fact fixed at packing, True when some DoRA adapter has dropout > 0 (such a batch runs
    the PyTorch reference in training); checked against the tensors when they are on the CPU.
    ``slots``: the slot table of the ``AdapterBank`` the adapters live in (a
    ``fastlora.adapters.routing.Slots``, which routings are checked against), or None.
    """
    A: torch.Tensor
    B: torch.Tensor
    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    max_rank: int
    magnitude: torch.Tensor | None = None
    weight_norm: torch.Tensor | None = None
    is_dora: torch.Tensor | None = None
    dropout: torch.Tensor | None = None
    dora_dropout: bool = False
    slots: Slots | None = None

    def __post_init__(self):
        n = self.offsets.shape[0] if self.offsets.dim() == 1 else -1
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[0]:
            raise ValueError(f"bank: A must be [S, K] and B [S, N] (lora_B transposed) with the "
                             f"same S, got {tuple(self.A.shape)} and {tuple(self.B.shape)}")
        for name in ("offsets", "ranks"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or tuple(t.shape) != (n,):
                raise ValueError(f"bank: {name} must be int32 [n], got {t.dtype} {tuple(t.shape)}")
        for name in ("scales", "dropout"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32
                                  or tuple(t.shape) != (n,)):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"bank: {name} must be a float32 tensor [{n}], got {got} "
                                 "(pack_adapters takes dropout as floats)")
        dora = (self.magnitude, self.weight_norm, self.is_dora)
        if any(t is None for t in dora) != all(t is None for t in dora):
            raise ValueError("bank: magnitude, weight_norm and is_dora go together (DoRA)")
        if self.magnitude is not None:
            rows = (n, self.B.shape[1])
            if tuple(self.magnitude.shape) != rows or tuple(self.weight_norm.shape) != rows:
                raise ValueError(f"bank: magnitude and weight_norm must be {list(rows)}, got "
                                 f"{list(self.magnitude.shape)} and {list(self.weight_norm.shape)}")
            if self.is_dora.dtype != torch.bool or tuple(self.is_dora.shape) != (n,):
                raise ValueError(f"bank: is_dora must be bool [{n}]")
        if self.offsets.device.type == "cpu" and n > 0 and not torch.compiler.is_compiling():
            self._check_values()

    def _check_values(self) -> None:
        """The value checks (CPU tensors only: on a GPU they would cost a host sync)."""
        off, rk = self.offsets.long(), self.ranks.long()
        if (rk < 0).any() or (rk > self.max_rank).any():
            raise ValueError(f"bank: ranks {self.ranks.tolist()} outside 0..max_rank={self.max_rank}")
        if (off < 0).any() or (off + rk > self.A.shape[0]).any():
            raise ValueError(f"bank: adapter rows (offsets + ranks) exceed A's {self.A.shape[0]} rows")
        cpu = [t.device.type == "cpu" for t in (self.dropout, self.is_dora) if t is not None]
        if not all(cpu):
            return
        if self.dropout is not None and not ((self.dropout >= 0) & (self.dropout < 1)).all():
            raise ValueError(f"bank: dropout must hold probabilities in [0, 1), got "
                             f"{self.dropout.tolist()}")
        on_dora = (self.dropout is not None and self.is_dora is not None
                   and bool(((self.dropout > 0) & self.is_dora).any()))
        if on_dora != self.dora_dropout:
            raise ValueError(f"bank: dora_dropout={self.dora_dropout}, but DoRA adapters with "
                             f"dropout > 0: {on_dora}")

    @property
    def n(self) -> int:
        return self.offsets.shape[0]

    def packed(self) -> PackedAdapters:
        return self

    def map(self, fn) -> PackedAdapters:
        """The same bank with ``fn`` applied to A, B and magnitude (e.g. a dtype change)."""
        return replace(self, A=fn(self.A), B=fn(self.B),
                       magnitude=fn(self.magnitude) if self.magnitude is not None else None)


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
