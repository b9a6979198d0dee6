"""``AdapterPool``: thousands of registered adapters, a few dozen resident on the device.

As S-LoRA: every registered adapter is read and checked once and kept in CPU memory (pinned
when the model is on a GPU, so its copy to the device is asynchronous); a fixed
``AdapterBank`` on the model's device holds ``slots`` of them. ``reserve(names)`` pages the
missing ones in, evicting the least recently used resident adapters that are not in
``names`` (the batch about to run: never evicted). On CUDA the copies run on a side stream
that first waits for the work already queued (so a slot is overwritten only after the steps
that read it), and the compute stream waits for the copies. The bank never moves or grows:
routings of earlier steps are refused by the slot generations, and captured graphs over the
bank stay valid.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from ..adapters.bank import AdapterBank, Prepared
from ..ops.checks import check_positive_int
from ..adapters.routing import BASE, Routing

__all__ = ["AdapterPool"]


class AdapterPool:
    """Adapters registered by name (any source ``fastlora.io`` reads, or ``{layer: (A, B,
    scale, magnitude)}``), paged into ``slots`` device slots of up to ``max_rank`` rows.
    ``slots`` and ``max_rank`` are at least 1; ``dtype``: the adapters' dtype on the device
    (default: the model's); ``dora``: DoRA buffers allocated up front (``AdapterBank(dora=
    True)``), so that a first DoRA page-in writes in place and a ``Server``'s CUDA graphs
    stay valid (without it, that page-in makes the server capture them again, once)."""

    def __init__(self, model: nn.Module, *, slots: int = 32, max_rank: int = 64,
                 dtype: torch.dtype | None = None, dora: bool = False):
        check_positive_int("slots", slots)
        check_positive_int("max_rank", max_rank)
        self.bank = AdapterBank(model, dtype=dtype, capacity=slots, max_rank=max_rank, fixed=True,
                                dora=dora)
        self.device = self.bank.device
        self._host: dict[str, Prepared] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident, least recently used first
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.hits = self.misses = self.evictions = 0

    @property
    def slots(self) -> int:
        return self.bank.capacity

    @property
    def names(self) -> list[str]:
        """Registered adapters."""
        return list(self._host)

    @property
    def resident(self) -> list[str]:
        """Adapters on the device, least recently used first."""
        return list(self._lru)

    def __contains__(self, name: str) -> bool:
        return name in self._host

    def __len__(self) -> int:
        return len(self._host)

    # ------------------------------------------------------------ registry

    def register(self, name: str, source, *, replace: bool = False) -> None:
        """Read and check adapter ``name`` once and keep it in CPU memory. ``replace``: a new
        version of a registered adapter; if resident it is rewritten in place now (routings
        made before refuse it; the next step serves the new version)."""
        if name in self._host and not replace:
            raise ValueError(f"adapter {name!r} is already registered; pass replace=True")
        prepared = self.bank.prepare(name, source, pin=self._stream is not None)
        self._host[name] = prepared
        if name in self._lru:
            with self._copies():
                self.bank.put(prepared, replace=True, non_blocking=self._stream is not None)

    def unregister(self, name: str) -> None:
        """Forget adapter ``name`` (and free its slot if resident)."""
        if name not in self._host:
            raise KeyError(f"unknown adapter {name!r}")
        del self._host[name]
        if name in self._lru:
            del self._lru[name]
            self.bank.unload(name)

    # ------------------------------------------------------------ paging

    def reserve(self, names: Iterable[str | None]) -> None:
        """Make the adapters of ``names`` (None / ``"__base__"``: none) resident, paging in the
        missing ones and evicting least recently used ones outside ``names``."""
        wanted = list(dict.fromkeys(a for a in names if a is not None and a != BASE))
        unknown = [a for a in wanted if a not in self._host]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown} (registered: {len(self._host)})")
        if len(wanted) > self.slots:
            raise RuntimeError(f"a batch of {len(wanted)} distinct adapters does not fit the "
                               f"pool's {self.slots} slots")
        missing = [a for a in wanted if a not in self._lru]
        self.hits += len(wanted) - len(missing)
        keep = set(wanted)
        with self._copies() if missing else contextlib.nullcontext():
            for a in wanted:  # in batch order: the first ones become the least recent
                if a in self._lru:
                    self._lru.move_to_end(a)
                    continue
                if len(self._lru) == self.slots:
                    victim = next(v for v in self._lru if v not in keep)
                    del self._lru[victim]
                    self.bank.unload(victim)
                    self.evictions += 1
                self.bank.put(self._host[a], non_blocking=self._stream is not None)
                self._lru[a] = None
                self.misses += 1

    def route(self, names: Iterable[str | None]) -> Routing:
        """The routing of a batch (one entry per sequence) over resident adapters."""
        return self.bank.index(names)

    def acquire(self, names: Iterable[str | None]) -> Routing:
        """``reserve(names)``, then the routing of ``names``."""
        names = list(names)
        self.reserve(names)
        return self.route(names)

    @contextlib.contextmanager
    def _copies(self):
        """Where page-in writes run: on CUDA a side stream that waits for the work queued so
        far, and that the compute stream then waits for."""
        if self._stream is None:
            yield
            return
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            main.wait_stream(self._stream)

    def __repr__(self) -> str:
        return (f"AdapterPool({len(self._host)} registered, {len(self._lru)}/{self.slots} resident, "
                f"max_rank={self.bank.max_rank}, hits {self.hits}, misses {self.misses}, "
                f"evictions {self.evictions})")

