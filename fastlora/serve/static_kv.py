"""``StaticKV`` and ``StaticRunning``: the running batch's KV cache in storage allocated once,
which decode steps captured in CUDA graphs read and write (``fastlora.serve.graphs``).

``StaticKV`` holds, per layer of the model, keys and values ``[max_batch, heads,
max_length, head_dim]`` in the model's dtype; ``columns`` ``[layers]`` int64, per layer the
column the next step writes (transformers' ``StaticLayer`` reads and advances it on the
device); the attention mask ``[max_batch, max_length]`` int64; the step's inputs
``ids`` / ``positions`` ``[max_batch, 1]`` int64 and its greedy tokens ``[max_batch]``
int64. ``cache(bucket)`` is a transformers ``StaticCache`` whose layers are views of the
first ``bucket`` rows: every bucket's graph reads the same storage, and nothing is ever
reallocated.

``StaticRunning`` is ``kv.Running``'s counterpart over it: rows ``0 .. B-1`` are the running
sequences, left-padded so that each row's last token is in column ``width - 1``. ``merge``
(a prefill's ``Running`` joins: its rows are copied in, the shorter side shifted right) and
``keep`` (rows gathered to the front, the leading columns no row uses shifted out) move the
data in place; each makes every temporary before it writes, so it changes all or nothing.
"""
from __future__ import annotations

import torch

from .kv import Running

__all__ = ["StaticKV", "StaticRunning", "static_cache_unsupported"]


def static_cache_unsupported(model) -> str | None:
    """Why transformers' ``StaticCache`` cannot hold ``model``'s decode (None: it can):
    every layer must be a plain full-attention ``StaticLayer``."""
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
    except ImportError as error:
        return f"transformers has no StaticCache ({error})"
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no transformers config"
    try:
        layers = StaticCache(config=config, max_cache_len=1).layers
    except Exception as error:  # a config StaticCache cannot read
        return f"StaticCache cannot be made for {type(model).__name__}: {error}"
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
    if kinds or not layers:
        return (f"{type(model).__name__}'s static cache has {kinds or 'no'} layers; CUDA graphs "
                "serve full-attention StaticLayer caches")
    return None


class StaticKV:
    """The storage (see the module docstring), shaped after a prefill's ``DynamicCache``
    layers (``kv.cache_layers``: keys ``[B, heads, L, head_dim]``)."""

    def __init__(self, layers, config, max_batch: int, max_length: int):
        first = layers[0].keys
        self.device, self.dtype = first.device, first.dtype
        self.config, self.max_batch, self.max_length = config, max_batch, max_length
        self.shapes = self.shapes_of(layers)

        def empty(heads, dim):
            return torch.zeros((max_batch, heads, max_length, dim), dtype=self.dtype,
                               device=self.device)

        self.keys = [empty(h, dk) for h, dk, _ in self.shapes]
        self.values = [empty(h, dv) for h, _, dv in self.shapes]
        self.columns = torch.zeros(len(layers), dtype=torch.long, device=self.device)
        self.mask = torch.zeros((max_batch, max_length), dtype=torch.long, device=self.device)
        self.inputs = torch.zeros((2, max_batch), dtype=torch.long, device=self.device)
        self.ids, self.positions = self.inputs[0, :, None], self.inputs[1, :, None]
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._caches: dict[int, object] = {}

    @staticmethod
    def shapes_of(layers) -> tuple:
        return tuple((layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1])
                     for layer in layers)

    def fits(self, layers) -> bool:
        """Whether a prefill's cache layers can be copied in (same layers, heads, head
        dims, dtype and device)."""
        first = layers[0].keys
        return (self.shapes_of(layers) == self.shapes and first.dtype == self.dtype
                and first.device == self.device)

    def cache(self, bucket: int):
        """A transformers ``StaticCache`` over rows ``0 .. bucket-1`` of the storage (made
        once per bucket)."""
        hit = self._caches.get(bucket)
        if hit is None:
            from transformers import StaticCache

            hit = StaticCache(config=self.config, max_cache_len=self.max_length)
            if len(hit.layers) != len(self.keys):
                raise TypeError(f"the model's static cache has {len(hit.layers)} layers, its "
                                f"prefill cache {len(self.keys)}")
            for i, layer in enumerate(hit.layers):
                keys, values = self.keys[i][:bucket], self.values[i][:bucket]
                # the layer's own initialization (whatever it records) on meta tensors of
                # this shape, then the storage's views and column counter in their place
                layer.lazy_initialization(keys[:, :, :1].to("meta"), values[:, :, :1].to("meta"))
                layer.keys, layer.values = keys, values
                layer.cumulative_length = self.columns[i]
                layer.device, layer.dtype = self.device, self.dtype
            self._caches[bucket] = hit
        return hit


class StaticRunning:
    """The running sequences in a ``StaticKV`` (see the module docstring): ``width`` (the
    column the next step writes) and ``lengths`` (each row's real token count: the position
    of its next token)."""

    def __init__(self, kv: StaticKV):
        self.kv, self.width, self.lengths = kv, 0, []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def load_step(self, tokens: list[int], bucket: int, pad: int) -> None:
        """The inputs of a one-token step over ``bucket`` rows: row i (< rows) feeds
        ``tokens[i]`` at its position, padding rows the ``pad`` token at position 0; column
        ``width`` of the mask is opened for every row of the bucket (each attends at least
        to itself)."""
        if self.width >= self.kv.max_length:
            raise RuntimeError(f"the static KV cache is full ({self.kv.max_length} columns)")
        padding = bucket - self.rows
        step = torch.tensor([tokens + [pad] * padding, self.lengths + [0] * padding])
        self.kv.inputs[:, :bucket].copy_(step)
        self.kv.mask[:bucket, self.width] = 1

    def stepped(self) -> None:
        """After a step: every row grew by the column ``width`` (the step advanced the
        device's column counters)."""
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]

    def rollback(self) -> None:
        """After a step that failed: the column counters back at ``width`` (what the step
        wrote to column ``width`` is overwritten by the next one) and the column closed."""
        self.kv.columns.fill_(self.width)
        if self.width < self.kv.max_length:
            self.kv.mask[:, self.width] = 0

    def merge(self, other: Running) -> None:
        """Append ``other``'s rows (a prefill's ``DynamicCache``; both sides padded on the
        left to the longer width), in place."""
        kv, rows, size = self.kv, self.rows, other.mask.shape[1]
        width, new = max(self.width, size), other.rows
        if rows + new > kv.max_batch or width >= kv.max_length:
            raise RuntimeError(f"{rows + new} rows of width {width} do not fit the static KV "
                               f"cache ({kv.max_batch} rows, {kv.max_length} columns)")
        shift = width - self.width
        if shift and rows:  # every temporary first: the writes below cannot fail
            moved = [(k[:rows, :, :self.width].clone(), v[:rows, :, :self.width].clone())
                     for k, v in zip(kv.keys, kv.values)]
            moved_mask = kv.mask[:rows, :self.width].clone()
            for (k, v), (mk, mv) in zip(zip(kv.keys, kv.values), moved):
                k[:rows, :, shift:width].copy_(mk)
                v[:rows, :, shift:width].copy_(mv)
            kv.mask[:rows, :width] = 0
            kv.mask[:rows, shift:width].copy_(moved_mask)
        start = width - size
        for k, v, layer in zip(kv.keys, kv.values, other.layers):
            k[rows:rows + new, :, start:width].copy_(layer.keys)
            v[rows:rows + new, :, start:width].copy_(layer.values)
        kv.mask[rows:rows + new] = 0
        kv.mask[rows:rows + new, start:width].copy_(other.mask)
        self.width = width
        self.lengths += other.lengths
        kv.columns.fill_(width)

    def keep(self, rows: list[int]) -> None:
        """Keep these rows only (moved to the front, in this order); drop the leading
        columns that are padding in all of them."""
        kv = self.kv
        index = torch.tensor(rows, device=kv.device, dtype=torch.long)
        mask = kv.mask[:, :self.width].index_select(0, index)
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else self.width
        width = self.width - first
        kept = [(k[:, :, first:self.width].index_select(0, index),
                 v[:, :, first:self.width].index_select(0, index))
                for k, v in zip(kv.keys, kv.values)]
        n = len(rows)
        for (k, v), (kk, kv_) in zip(zip(kv.keys, kv.values), kept):
            k[:n, :, :width].copy_(kk)
            v[:n, :, :width].copy_(kv_)
        kv.mask.zero_()
        kv.mask[:n, :width].copy_(mask[:, first:])
        self.width = width
        self.lengths = [self.lengths[i] for i in rows]
        kv.columns.fill_(width)
