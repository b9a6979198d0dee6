"""``Routing``: which adapter each row of a batch uses, made once per model forward and read
by every layer of it (vLLM's LoRA mapping / punica metadata).

A routing holds one adapter slot per *entry* (``-1``: the base layer only): per sequence
(``B`` entries for x ``[B, T, K]``) or per row. A layer whose x has ``m`` rows gives each
entry ``m / entries`` consecutive rows, so one routing serves the prefill (``T`` tokens per
sequence) and the decode steps (one) of a generation. Everything a layer needs is made on
the device without a host sync and kept per row count: the per-row slots (``row_index``,
all a decode kernel that gathers each row's adapter without sorting reads) and the rows
grouped by adapter (``fastlora.kernels.multi_meta.group_rows``, made when a kernel first
needs them). So ``fastlora.multi_lora_linear`` given a routing does no
per-layer checks or grouping.

Tenant isolation: a routing made from an ``AdapterBank`` (``bank.index``) records the
generation of each slot it points to (``Slots``); a layer refuses it once one of those
slots was unloaded or replaced, naming the adapter and slot, so a routing never reaches an
adapter loaded after it was made. Indices of empty slots are refused when it is made.

CUDA graphs: ``Routing.static(entries, rows, ...)`` allocates its buffers once;
``assign`` rewrites them in place (device copies and device ops, no new tensors seen by a
layer), so a captured decode step replays with the new assignment.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..ops import checks

__all__ = ["BASE", "Routing", "Slots"]

BASE = "__base__"  # the name of the base layer in an assignment (as PEFT's adapter_names)
_GENERATIONS = itertools.count(1)  # unique over all banks: a generation is never reused


class Slots:
    """The slot table of an adapter bank: per slot the name and generation of the adapter it
    holds (generation 0: empty), on the host, and ``live`` ``[capacity]`` bool on the device
    (for checks of device indices without a host sync). ``version`` changes with every
    change, so a routing revalidates only when the table changed."""

    def __init__(self, capacity: int, device: torch.device):
        self.names: list[str | None] = [None] * capacity
        self.generations = [0] * capacity
        self.live = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.version = 0

    @property
    def capacity(self) -> int:
        return len(self.generations)

    def fill(self, slot: int, name: str) -> None:
        """A new adapter (or a new version of one) now holds ``slot``."""
        self.names[slot], self.generations[slot] = name, next(_GENERATIONS)
        self.live[slot] = True
        self.version += 1

    def empty(self, slot: int) -> None:
        self.names[slot], self.generations[slot] = None, 0
        self.live[slot] = False
        self.version += 1

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self.names += [None] * extra
        self.generations += [0] * extra
        self.live = torch.cat([self.live, self.live.new_zeros(extra)])
        self.version += 1

    def snapshot(self, slots) -> dict[int, tuple[int, str]]:
        """``{slot: (generation, name)}`` of the given live slots."""
        return {s: (self.generations[s], self.names[s]) for s in slots}


@dataclass(eq=False)
class Routing:
    """Slots per entry, ``index`` ``[E]`` int32 on the device (-1: base only), into banks of
    ``n`` slots. ``slots``: the slot table of the bank it was made for (None: adapters packed
    by the caller, e.g. ``fastlora.peft``), ``expected``: the ``{slot: (generation, name)}``
    it relies on. ``names``: the entries' adapter names when made from names;
    ``slot_names``: slot -> adapter name when the caller packs adapters in that order
    (``fastlora.peft``). Make one with ``from_names``, ``from_index`` or ``static``
    (or ``AdapterBank.index``)."""
    index: torch.Tensor
    n: int
    slots: Slots | None = None
    expected: dict[int, tuple[int, str]] | None = None
    names: tuple[str | None, ...] | None = None
    slot_names: tuple[str, ...] | None = None
    present: frozenset = frozenset()  # the names of ``names``
    rows: int | None = None  # a static routing's row count (its buffers' size)
    _seen: int = field(default=-1, repr=False)  # the slot-table version last validated
    _rows: dict = field(default_factory=dict, repr=False)  # m -> row index [m]
    _groups: dict = field(default_factory=dict, repr=False)  # m -> RowGroups

    def __post_init__(self):
        if self.slots is not None:
            self._seen = self.slots.version

    # ------------------------------------------------------------ making

    @classmethod
    def from_names(cls, names: Sequence[str | None], slot_of, n: int, device, *,
                   slots: Slots | None = None, slot_names: tuple[str, ...] | None = None
                   ) -> Routing:
        """One entry per name: ``slot_of(name)`` (None or ``"__base__"``: -1). One host-to-
        device copy; with ``slots``, the generations of the slots used are recorded."""
        names = tuple(names)
        index = [-1 if a is None or a == BASE else slot_of(a) for a in names]
        used = {i for i in index if i >= 0}
        expected = slots.snapshot(used) if slots is not None else None
        return cls(torch.tensor(index, dtype=torch.int32, device=device), n, slots, expected,
                   names, slot_names, frozenset(names))

    @classmethod
    def from_index(cls, index: torch.Tensor, n: int, *, slots: Slots | None = None,
                   device=None, rows: int | None = None) -> Routing:
        """One entry per element of ``index`` (an integer tensor of any shape, on ``device``
        when given; ``rows``: the number of entries required), each in ``-1 .. n - 1`` and,
        with ``slots``, a live slot. CPU indices are checked on the host; device indices by
        a device-side assert (no sync; it surfaces at the next synchronization). A device
        index does not say on the host which slots it uses, so its routing relies on every
        slot live when it is made."""
        flat = checks.check_index(index, n, index.device if device is None else device, rows)
        if slots is None:
            return cls(flat.to(torch.int32), n)
        if flat.device.type == "cpu" and not torch.compiler.is_compiling():
            used = sorted(set(flat[flat >= 0].tolist()))
            empty = [s for s in used if not slots.generations[s]]
            if empty:
                raise ValueError(f"adapter_index holds {empty[0]}, an empty slot of the bank (no "
                                 "adapter loaded there; -1 = base only)")
        else:
            if flat.numel():
                live = slots.live[flat.clamp(0, n - 1).long()]
                torch._assert_async(((flat < 0) | live).all(),
                                    "fastlora: adapter index on an empty slot of the bank")
            used = [s for s, g in enumerate(slots.generations) if g]
        return cls(flat.to(torch.int32), n, slots, slots.snapshot(used))

    @classmethod
    def static(cls, entries: int, rows: int, n: int, device, *, slots: Slots | None = None
               ) -> Routing:
        """A routing over fixed buffers for batches of ``rows`` rows (``entries`` dividing
        it), all base rows until ``assign``: for CUDA graphs (decode buckets)."""
        if entries <= 0 or rows % entries:
            raise ValueError(f"a static routing needs entries > 0 dividing rows, got "
                             f"{entries} entries for {rows} rows")
        routing = cls(torch.full((entries,), -1, dtype=torch.int32, device=device), n, slots,
                      {} if slots is not None else None, rows=rows)
        routing._rows[rows] = routing._expand(rows)
        from ..kernels.multi_meta import gathers

        if not gathers(rows):  # decode buckets gather each row's adapter: nothing to sort
            routing.groups(rows)
        return routing

    # ------------------------------------------------------------ static buffers

    def assign(self, assignment, slot_of=None) -> None:
        """New entries for a static routing, in place: ``assignment`` a sequence of names
        (``slot_of`` maps them, as ``from_names``) or an integer tensor of slots. Writes the
        existing buffers only (a captured graph reading them replays the new batch)."""
        if self.rows is None:
            raise TypeError("assign() rewrites a static routing (Routing.static); make a new "
                            "routing for a new batch")
        if isinstance(assignment, torch.Tensor):
            new = Routing.from_index(assignment, self.n, slots=self.slots, device=self.index.device)
        else:
            if slot_of is None:
                raise TypeError("assign(names) needs slot_of (or use AdapterBank.assign)")
            new = Routing.from_names(assignment, slot_of, self.n, self.index.device,
                                     slots=self.slots)
        if new.index.numel() != self.index.numel():
            raise ValueError(f"this static routing has {self.index.numel()} entries, got "
                             f"{new.index.numel()}")
        self.index.copy_(new.index)
        self.expected, self.names, self.present = new.expected, new.names, new.present
        self._seen = new._seen
        rows = self._rows[self.rows]
        if rows is not self.index:
            rows.copy_(self._expand(self.rows))
        groups = self._groups.get(self.rows)
        if groups is not None:
            fresh = self._group(rows)
            for name in ("perm", "keys", "seg"):
                getattr(groups, name).copy_(getattr(fresh, name))

    # ------------------------------------------------------------ use

    @property
    def entries(self) -> int:
        return self.index.numel()

    def validate(self) -> None:
        """Raise if a slot this routing relies on changed since it was made (an adapter
        unloaded or replaced). Costs a comparison while the slot table is unchanged."""
        if self.slots is None or self.slots.version == self._seen:
            return
        for slot, (gen, name) in (self.expected or {}).items():
            if slot >= self.slots.capacity or self.slots.generations[slot] != gen:
                now = self.slots.names[slot] if slot < self.slots.capacity else None
                held = f"now holds {now!r}" if now is not None else "is now empty"
                what = "replaced" if now == name else "unloaded"
                raise RuntimeError(f"this routing sends rows to adapter {name!r} in slot {slot}, "
                                   f"which was {what} after the routing was made (slot {slot} "
                                   f"{held}): make a new routing for the batch")
        self._seen = self.slots.version

    def check(self, bank) -> None:
        """The routing fits ``bank`` (a ``PackedAdapters``) and still holds: the same slot
        count and slot table, no slot it uses changed. O(1) while nothing changed."""
        if bank.n != self.n:
            grew = " (the bank grew since it was made)" if self.slots is not None else ""
            raise ValueError(f"this routing is for {self.n} adapter slots, the layer's bank has "
                             f"{bank.n}{grew}: make a new routing")
        table = getattr(bank, "slots", None)
        if table is not self.slots:
            if self.slots is None:
                raise ValueError("these adapters come from an AdapterBank: route with the "
                                 "bank's own index (bank.index(names) or bank.route(...))")
            raise ValueError("this routing was made by another AdapterBank")
        if not torch.compiler.is_compiling():
            self.validate()

    def row_index(self, m: int) -> torch.Tensor:
        """The slot of each of ``m`` rows (a layer input of ``m`` rows), int32 ``[m]``; made
        once per row count."""
        if torch.compiler.is_compiling():
            return self._expand(m)
        hit = self._rows.get(m)
        if hit is None:
            if self.rows is not None:
                raise ValueError(f"this static routing serves batches of {self.rows} rows, "
                                 f"got {m}")
            hit = self._rows[m] = self._expand(m)
        return hit

    def groups(self, m: int):
        """The ``m`` rows grouped by adapter (``fastlora.kernels.multi_meta.RowGroups``),
        made once per row count, when a kernel first needs them."""
        if torch.compiler.is_compiling():
            return self._group(self._expand(m))
        hit = self._groups.get(m)
        if hit is None:
            hit = self._groups[m] = self._group(self.row_index(m))
        return hit

    def _expand(self, m: int) -> torch.Tensor:
        entries = self.index.numel()
        if (entries == 0 and m) or (entries and m % entries):
            raise ValueError(f"the routing has {entries} entries (sequences or rows), the "
                             f"layer's input {m} rows: rows must be a multiple of the entries")
        per = m // entries if entries else 0
        return self.index if per == 1 else self.index.repeat_interleave(per)

    def _group(self, rows: torch.Tensor):
        from ..kernels.multi_meta import group_rows

        return group_rows(rows, self.n)

    def __len__(self) -> int:
        return self.entries
