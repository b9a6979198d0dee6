"""``Running``: the KV cache of the sequences being decoded together, on transformers'
``DynamicCache``, left-padded to one length, with their attention mask and real lengths.

Sequences join (``merge``: the shorter side is padded on the left) and leave (``keep``: rows
selected, then the columns no row uses any more trimmed) between decode steps. A decode
step feeds ``mask_for_step()`` and ``positions()`` (each row's next position: its real
length) to the model, which appends one column to every layer of the cache; ``stepped``
records it, and ``rollback`` undoes what a step that raised appended.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cache_keyword(model) -> str:
    """The keyword under which ``model``'s forward takes its KV cache: ``cache``
    (transformers 5.25) or ``past_key_values`` (5.17 and before, which ignore a ``cache=``
    argument: it lands in ``**kwargs``)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_layers(cache) -> list:
    """The per-layer stores of a ``DynamicCache`` (each with ``keys`` / ``values``
    ``[B, heads, L, head_dim]``); refuses caches whose layers are not plain full-attention
    layers (sliding windows, linear attention), which cannot be padded and spliced so."""
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", ()))
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized
                         for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers}) or ["none"]
        raise TypeError(f"fastlora.serve batches full-attention DynamicCache layers; this model's "
                        f"cache has {kinds}")
    return layers


class Running:
    """The cache ``[B, ..., L, ...]`` of B sequences, ``mask`` ``[B, L]`` long (0 on left
    padding) and ``lengths``: each row's real token count (the position of its next token)."""

    def __init__(self, cache, mask: torch.Tensor, lengths: list[int]):
        self.cache, self.mask, self.lengths = cache, mask, list(lengths)
        self.layers = cache_layers(cache)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def mask_for_step(self) -> torch.Tensor:
        """The attention mask of a one-token step: ``[B, L + 1]``."""
        return F.pad(self.mask, (0, 1), value=1)

    def positions(self) -> torch.Tensor:
        """``[B, 1]`` positions of the next token of each row."""
        return torch.tensor(self.lengths, device=self.mask.device)[:, None]

    def stepped(self, mask: torch.Tensor) -> None:
        """After a step fed ``mask``: the cache grew by one column."""
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]

    def merge(self, other: Running) -> None:
        """Append ``other``'s rows (both padded on the left to the longer length). All or
        nothing: every new tensor is made before any layer changes."""
        size, other_size = self.mask.shape[1], other.mask.shape[1]
        width = max(size, other_size)
        merged = [[torch.cat([F.pad(getattr(mine, attr), (0, 0, width - size, 0)),
                              F.pad(getattr(theirs, attr), (0, 0, width - other_size, 0))])
                   for attr in ("keys", "values")]
                  for mine, theirs in zip(self.layers, other.layers)]
        mask = torch.cat([F.pad(self.mask, (width - size, 0)),
                          F.pad(other.mask, (width - other_size, 0))])
        for layer, (keys, values) in zip(self.layers, merged):
            layer.keys, layer.values = keys, values
        self.mask = mask
        self.lengths += other.lengths

    def rollback(self) -> None:
        """After a step that failed: drop the columns it appended to some layers (the cache
        is again ``mask``'s length in every layer)."""
        length = self.mask.shape[1]
        for layer in self.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]

    def keep(self, rows: list[int]) -> None:
        """Keep these rows only; drop the leading columns that are padding in all of them."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, first:]
        for layer in self.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.lengths = [self.lengths[i] for i in rows]
