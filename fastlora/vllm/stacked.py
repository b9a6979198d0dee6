"""``StackedAdapters``: the LoRA slots of one vLLM LoRA layer held as a fastlora
``PackedAdapters``, with vLLM-shaped views into it that vLLM's ``set_lora`` / ``reset_lora``
write through (so the weights exist once). Plain PyTorch: no vLLM import.

vLLM's layout (0.32): the layer's output is ``s`` slices of widths ``N_j`` (1 for a plain
layer, 3 for merged QKV, 2 for merged gate/up), ``N = sum N_j``; per slice
``lora_a_stacked[j]`` ``[n, 1, R, K]`` and ``lora_b_stacked[j]`` ``[n, 1, N_j, R]`` for
``n`` slots of the largest rank ``R`` (an adapter of rank ``r < R`` leaves the rest zero;
its scaling is folded into B). Slot ``i`` adds ``x A_ij^T B_ij^T`` to slice j's columns.

Packed: slot ``i`` is one adapter of ``s * R`` rows, ``A`` ``[n s R, K]``, ``B``
``[n s R, N]``: rows ``(i s + j) R .. + R`` hold slice j's A and, in B, its ``B^T`` in slice
j's columns with zeros elsewhere (block diagonal: each slice gets exactly its own sum).
Scales are 1; ``ranks[i]`` stops after the last non-zero row of slot i's A (0: an empty
slot), so the kernels skip vLLM's rank padding.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters.packed import PackedAdapters


class StackedAdapters:
    """``slots`` adapter slots of rank up to ``rank`` over a layer ``[sum(slices), in_features]``.

    ``bank``: the ``PackedAdapters`` for ``fastlora.multi_lora_linear``; ``lora_a_stacked``
    and ``lora_b_stacked``: tuples of views shaped as vLLM's (see the module docstring).
    Call ``refresh(slot)`` after writing a slot through the views."""

    def __init__(self, slots: int, rank: int, in_features: int, slices: Sequence[int],
                 dtype: torch.dtype, device: torch.device | str):
        if slots < 1 or rank < 1 or not slices or min(slices) < 1:
            raise ValueError(f"StackedAdapters needs slots, rank and slice widths >= 1, got "
                             f"slots={slots}, rank={rank}, slices={tuple(slices)}")
        self.slots, self.rank, self.slices = slots, rank, tuple(slices)
        s, n_out = len(self.slices), sum(self.slices)
        per = s * rank  # rows per slot
        A = torch.zeros(slots * per, in_features, dtype=dtype, device=device)
        B = torch.zeros(slots * per, n_out, dtype=dtype, device=device)
        self.bank = PackedAdapters(
            A=A, B=B,
            offsets=torch.arange(0, slots * per, per, dtype=torch.int32, device=device),
            ranks=torch.zeros(slots, dtype=torch.int32, device=device),
            scales=torch.ones(slots, dtype=torch.float32, device=device), max_rank=per)
        a4 = A.view(slots, s, rank, in_features)
        b4 = B.view(slots, s, rank, n_out)
        starts = [sum(self.slices[:j]) for j in range(s)]
        self.lora_a_stacked = tuple(a4[:, j].unsqueeze(1) for j in range(s))
        self.lora_b_stacked = tuple(
            b4[:, j, :, start:start + width].transpose(1, 2).unsqueeze(1)
            for j, (start, width) in enumerate(zip(starts, self.slices)))

    @classmethod
    def like(cls, lora_a_stacked: Sequence[torch.Tensor],
             lora_b_stacked: Sequence[torch.Tensor]) -> StackedAdapters:
        """Storage for a vLLM layer's ``lora_a_stacked`` / ``lora_b_stacked`` (shapes as in
        the module docstring), holding their current values."""
        if len(lora_a_stacked) != len(lora_b_stacked) or not lora_a_stacked:
            raise ValueError(f"lora_a_stacked and lora_b_stacked must hold one tensor per "
                             f"slice, got {len(lora_a_stacked)} and {len(lora_b_stacked)}")
        n, _, rank, k = lora_a_stacked[0].shape
        for a, b in zip(lora_a_stacked, lora_b_stacked):
            if (a.shape[0], a.shape[2:]) != (n, (rank, k)) or b.dim() != 4 or \
                    (b.shape[0], b.shape[3]) != (n, rank):
                raise ValueError(f"vLLM's stacked LoRA weights must be [n, 1, R, K] and "
                                 f"[n, 1, N_j, R] alike, got {list(a.shape)} and {list(b.shape)}")
        stacked = cls(n, rank, k, [b.shape[2] for b in lora_b_stacked], lora_a_stacked[0].dtype,
                      lora_a_stacked[0].device)
        for mine, theirs in zip(stacked.lora_a_stacked + stacked.lora_b_stacked,
                                tuple(lora_a_stacked) + tuple(lora_b_stacked)):
            mine.copy_(theirs)
        for slot in range(n):
            stacked.refresh(slot)
        return stacked

    def refresh(self, slot: int) -> None:
        """Re-read slot ``slot``'s rank from its A rows (after vLLM wrote or cleared it).
        Reads one number back from the device: vLLM calls this when it loads an adapter
        into a slot, not per step."""
        per = self.bank.max_rank
        rows = self.bank.A[slot * per:(slot + 1) * per]
        used = rows.ne(0).any(dim=1).nonzero()
        self.bank.ranks[slot] = int(used[-1]) + 1 if used.numel() else 0
