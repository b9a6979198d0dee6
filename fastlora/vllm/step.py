"""``StepRouting``: the ``fastlora.adapters.routing.Routing`` of vLLM's current step, made once per
step from vLLM's token mapping (when vLLM updates its punica metadata, outside any model
forward) and read by every LoRA layer the plugin took over. Plain PyTorch: no vLLM import.
"""
from __future__ import annotations

import torch

from ..adapters.routing import Routing


class StepRouting:
    """The routing of one vLLM punica wrapper's batch over ``slots`` adapter slots.

    ``update(token_slots, any_adapter)``: vLLM's per-token slot ``[T]`` (int64, -1: no
    adapter) for the step's ``T`` scheduled tokens. ``routing(rows)``: the routing for a
    layer input of ``rows`` rows, or None when no token of the step uses an adapter (the
    layer then runs vLLM's own base GEMM). A layer input padded past the scheduled tokens
    (vLLM pads batches, e.g. for CUDA graphs) gets its padding rows routed to the base."""

    def __init__(self, slots: int):
        self.slots = slots
        self._routing: Routing | None = None
        self._padded: dict[int, Routing] = {}

    def update(self, token_slots: torch.Tensor, any_adapter: bool) -> None:
        self._padded = {}
        self._routing = Routing.from_index(token_slots, self.slots) if any_adapter else None

    def routing(self, rows: int) -> Routing | None:
        routing = self._routing
        if routing is None or rows == routing.entries:
            return routing
        if rows < routing.entries:
            raise ValueError(f"fastlora: a LoRA layer got {rows} rows, fewer than the "
                             f"{routing.entries} tokens vLLM scheduled in this step")
        hit = self._padded.get(rows)
        if hit is None:
            pad = routing.index.new_full((rows - routing.entries,), -1)
            hit = self._padded[rows] = Routing.from_index(torch.cat([routing.index, pad]),
                                                          self.slots)
        return hit
