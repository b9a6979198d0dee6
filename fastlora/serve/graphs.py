"""``GraphDecoder``: a ``Server``'s decode steps replayed from CUDA graphs, one per batch-size
bucket (as vLLM: 1, 2, 4, 8, 16, 24, 32, ... up to ``max_batch``).

A step of B running rows runs the graph of the smallest bucket >= B; rows B.. of the bucket
are padding (the pad token at position 0, base model only, attending to themselves; their
tokens are ignored). What a bucket's graph captured, all allocated once and rewritten in
place before each replay:

* the KV cache: a ``StaticKV`` (transformers ``StaticCache`` layers over storage of
  ``max_batch`` rows and ``max_length`` columns, a device column counter per layer), the
  attention mask, the token ids and positions, the greedy tokens out;
* the routing: the bucket's ``AdapterBank.static_index`` routing, given the step's adapters
  by ``bank.assign`` (padding rows: the base model);
* the adapter bank's storage and the model's parameters and buffers, read where they were.

A bucket is captured at its first step: the step runs eagerly twice first, on a side stream
(Triton compiles and autotunes, launch plans are made; ``kernels/capture.py`` refuses an
autotune under capture), then once under ``torch.cuda.graph`` (a private memory pool per
graph). Page-ins write the bank in place, so graphs replay the adapters paged in after them.

Before every step the decoder checks what the graphs baked in: ``AdapterBank.layout()`` (the
slot count, which layers some adapter covers, each layer's storage addresses: recomputed
only when the slot table's version moved, as every change of it comes with a ``put``,
``unload`` or growth) and every parameter and buffer of the model (address, dtype, version:
replaced, cast, moved or written in place, which DoRA's cached norms depend on). When one
changed, all graphs (and the static routings) are dropped with the reason counted in
``invalidations`` and captured again at their next step: a graph is never replayed over
state it did not capture. A DoRA adapter paged into a bank without DoRA buffers allocates
them (a layout change: one re-capture); ``AdapterPool(dora=True)`` allocates them up front
and nothing is captured again. A capture that fails turns graphs off (``disabled`` says
why, with a warning): the same steps then run eagerly over the same static buffers.

Python inside the model's forward (hooks, checks) runs at the eager warm-up and capture of
each bucket, not at replays.
"""
from __future__ import annotations

import collections
import warnings

import torch
from torch import nn

from .attach import routed
from .kv import Running
from .static_kv import StaticKV, StaticRunning

__all__ = ["CaptureError", "GraphDecoder", "bucket_for", "buckets"]

WARMUP = 2  # eager runs of a step before its capture


def buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a graph is captured for: 1, 2, 4, then multiples of 8, and
    ``max_batch`` (the largest)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += range(8, max_batch, 8)
    return (*sizes, max_batch)


def bucket_for(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket of ``sizes`` (ascending) holding ``rows`` rows."""
    for size in sizes:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket ({sizes[-1]})")


class CaptureError(RuntimeError):
    """Capturing a step failed (its eager warm-up ran)."""


def _capture(step, device: torch.device):
    """``step`` warmed up on a side stream (an error there propagates: a failed forward),
    then captured into a CUDA graph (an error there: ``CaptureError``): its replay."""
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):
            step.warm_up()
    finally:
        main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as error:
        raise CaptureError(f"capturing the decode step of {step.rows} rows failed: "
                           f"{error!r}") from error
    return graph.replay


class _Step:
    """One bucket's decode step over the static buffers (what a graph captures)."""

    def __init__(self, decoder: GraphDecoder, bucket: int, batch: StaticRunning):
        kv = batch.kv
        self.batch, self.model, self.bank = batch, decoder.model, decoder.bank
        self.routing = decoder.routing(bucket)
        self.args = dict(input_ids=kv.ids[:bucket], attention_mask=kv.mask[:bucket],
                         position_ids=kv.positions[:bucket], use_cache=True,
                         **{decoder.cache_arg: kv.cache(bucket)}, **decoder.extra)
        self.tokens, self.rows = kv.tokens[:bucket], bucket

    def __call__(self) -> None:
        with routed(self.routing):
            logits = self.model(**self.args).logits
        self.tokens.copy_(logits[:, -1].argmax(-1))

    def warm_up(self) -> None:
        """The step run eagerly ``WARMUP`` times, the column counters put back after each
        (a forward that raises propagates: the caller rolls the batch back)."""
        for _ in range(WARMUP):
            self()
            self.batch.kv.columns.fill_(self.batch.width)


class GraphDecoder:
    """Greedy one-token decode steps of ``model`` (attached to ``bank``) through CUDA graphs
    per bucket (see the module docstring). ``cache_arg`` / ``extra``: the forward's cache
    keyword and extra arguments (``Server``'s); ``pad``: the padding rows' token.
    Counters: ``captures``, ``replays``, ``invalidations`` (reason -> count); ``disabled``:
    why graphs are off (None: on)."""

    devices = ("cuda",)  # where graphs are captured
    capture = staticmethod(_capture)  # (step, device) -> replay

    def __init__(self, model: nn.Module, bank, *, max_batch: int, max_length: int, pad: int,
                 cache_arg: str, extra: dict):
        self.model, self.bank, self.pad = model, bank, pad
        self.max_batch, self.max_length = max_batch, max_length
        self.cache_arg, self.extra = cache_arg, extra
        self.sizes = buckets(max_batch)
        self.kv: StaticKV | None = None
        self.captures = self.replays = 0
        self.invalidations: collections.Counter[str] = collections.Counter()
        self.disabled: str | None = None
        self._runs: dict[int, tuple] = {}  # bucket -> (replay, True) or (eager step, False)
        self._routings: dict[int, object] = {}
        self._weights = [(owner, name) for module in model.modules()
                         for owner in (module._parameters, module._buffers)
                         for name, t in owner.items() if t is not None]
        self._seen_version, self._layout = None, None
        self._key = None

    # ------------------------------------------------------------ batches

    def start(self, joined: Running) -> StaticRunning:
        """A running batch in the static cache, holding a prefill's rows (the storage is
        allocated at the first one, and again if the model's cache layout changed)."""
        if self.kv is None or not self.kv.fits(joined.layers):
            if self.kv is not None:
                self._drop("the model's KV cache layout changed (a new static cache)")
            self.kv = StaticKV(joined.layers, getattr(self.model, "config", None),
                               self.max_batch, self.max_length)
        batch = StaticRunning(self.kv)
        batch.merge(joined)
        return batch

    def routing(self, bucket: int):
        """The bucket's static routing (made once per bank layout)."""
        hit = self._routings.get(bucket)
        if hit is None:
            hit = self._routings[bucket] = self.bank.static_index(bucket)
        return hit

    def bucket(self, rows: int) -> int:
        return bucket_for(rows, self.sizes)

    # ------------------------------------------------------------ steps

    def decode(self, batch: StaticRunning, tokens: list[int], adapters: list) -> list[int]:
        """One step: ``tokens`` (each row's last token) in, each row's next greedy token
        out; ``adapters``: each row's adapter (None: base), resident in the bank."""
        rows = batch.rows
        bucket = self.bucket(rows)
        self._revalidate()
        self.bank.assign(self.routing(bucket), [*adapters, *[None] * (bucket - rows)])
        batch.load_step(tokens, bucket, self.pad)
        if bucket not in self._runs:
            self._runs[bucket] = self._capture(bucket, batch)
        run, graphed = self._runs[bucket]
        run()
        self.replays += graphed
        out = self.kv.tokens[:rows].tolist()
        batch.stepped()
        return out

    def _capture(self, bucket: int, batch: StaticRunning) -> tuple:
        """(the bucket's replay, True), or (its eager step, False) while graphs are off."""
        step = _Step(self, bucket, batch)
        if self.disabled is not None:
            return step, False
        try:
            replay = self.capture(step, self.kv.device)
        except CaptureError as error:
            self.disabled = str(error)
            warnings.warn(f"fastlora.serve: CUDA graphs are off ({error}); decode steps run "
                          "eagerly", RuntimeWarning, stacklevel=4)
            return step, False
        self.captures += 1
        self._key = self._current_key()  # as captured
        return replay, True

    # ------------------------------------------------------------ validity

    def _current_key(self) -> tuple:
        slots = self.bank.slots
        if slots.version != self._seen_version:  # put / unload / growth happened
            self._layout, self._seen_version = self.bank.layout(), slots.version
        weights = []
        for owner, name in self._weights:
            t = owner.get(name)
            weights.append(None if t is None else (t.data_ptr(), t.dtype, t._version))
        return self._layout, tuple(weights)

    def _revalidate(self) -> None:
        """Drop every graph whose captured state changed (see the module docstring)."""
        key = self._current_key()
        if self._key is not None and key != self._key and self._runs:
            self._drop(_why(self._key, key))
        self._key = key

    def _drop(self, reason: str) -> None:
        if self._runs:
            self.invalidations[reason] += 1
        self._runs.clear()
        self._routings.clear()


def _why(old: tuple, new: tuple) -> str:
    """What changed between two keys of ``GraphDecoder._current_key``."""
    (old_layout, _), (new_layout, _) = old, new
    if old_layout == new_layout:
        return ("the model's parameters or buffers changed (replaced, cast, moved or written "
                "in place)")
    (old_slots, old_layers), (new_slots, new_layers) = old_layout, new_layout
    if old_slots != new_slots:
        return f"the adapter bank grew ({old_slots} -> {new_slots} slots)"
    before, after = dict(old_layers), dict(new_layers)
    if before.keys() != after.keys():
        return "the layers some adapter covers changed"
    if any(before[name].magnitude is None and layer.magnitude is not None
           for name, layer in after.items()):
        return ("a DoRA adapter allocated the bank's DoRA buffers (AdapterPool(dora=True) "
                "allocates them up front)")
    return "the adapter bank's storage moved"
