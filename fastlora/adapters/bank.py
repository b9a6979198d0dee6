"""``AdapterBank``: many LoRA / DoRA adapters resident at once, for per-row adapter batches.

One bank serves a model (or a single layer): adapters are loaded by name (from a PEFT
directory, a ``.safetensors`` file, a state dict or a ``fastlora.io.Adapter``), unloaded,
or replaced at run time; ``bank.index(names)`` gives the ``fastlora.adapters.routing.Routing`` of a
batch (one entry per sequence or row) for ``fastlora.multi_lora_linear``, and
``bank[module_name]`` the layer's :class:`LayerBank`.

Layout (per base layer): adapters are packed along the rank, not stacked and padded to the
largest rank: adapter i owns rows ``offsets[i] .. offsets[i] + ranks[i]`` of ``A [S, K]``
and ``B [S, N]`` (lora_B transposed). A stacked ``[n, R_max, K]`` layout wastes
``(R_max - r) / R_max`` of its memory on every smaller adapter (7/8 for a rank-8 adapter
next to rank-64 ones) and invites the kernels to compute on the padding; packed rows cost
the real ranks in memory and in the kernels. Storage has a fixed capacity (adapter slots
and rows) written in place, so replacing an adapter keeps tensor addresses (CUDA graphs,
no recompilation); when an adapter does not fit, the layer repacks into tensors of twice
the capacity (new addresses: recapture graphs; reserve capacity up front to avoid it).
Freed rows are reused first-fit. ``fixed=True`` instead gives every slot ``max_rank`` rows
up front: nothing ever moves or grows, and a full bank refuses another adapter (the
adapter pool of ``fastlora.serve`` pages adapters through such a bank). An adapter's index
(slot) is shared by all layers; a layer an adapter does not cover holds rank 0 for it (the
base only, as PEFT).

Tenant isolation: the bank's slot table (``fastlora.adapters.routing.Slots``) gives each loaded
adapter a new generation; a routing records those of its slots, and every layer refuses
it once one of them was unloaded or replaced. An index on an empty slot is an error.
"""
from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .packed import PackedAdapters
from ..ops.cache import Refreshable, Stamped
from ..ops.checks import FLOAT32_MAX
from ..functional import dora_weight_norm
from ..nn.layers import BNB_4BIT, CONV1D, LINEAR, linear_kind
from ..choice.plans import MultiPlans
from .routing import BASE, Routing, Slots

__all__ = ["AdapterBank", "LayerBank", "LayerLayout", "Prepared"]

_STORAGE = ("A", "B", "offsets", "ranks", "scales", "magnitude", "weight_norm", "is_dora")
# what a CUDA graph over a layer bakes in (``LayerBank.layout``): the kernels' rank bound,
# then per storage tensor its (address, dtype, shape), None while not allocated
LayerLayout = namedtuple("LayerLayout", ("rank_bound", *_STORAGE))


@dataclass(frozen=True)
class LayerTensors:
    """One layer of an adapter, checked and ready to write: A ``[r, K]``, BT ``[r, N]``
    (lora_B transposed, contiguous), both in the bank's dtype; scale; DoRA magnitude ``[N]``
    or None."""
    A: torch.Tensor
    BT: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.BT, self.magnitude)
                   if t is not None)


@dataclass(frozen=True)
class Prepared:
    """An adapter checked against a bank (``AdapterBank.prepare``): layer name ->
    ``LayerTensors``; ``put`` writes it without checking again."""
    name: str
    layers: dict[str, LayerTensors]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())


class LayerBank:
    """One base layer's adapters (weight ``[N, K]``), packed along the rank in fixed-capacity
    storage: ``capacity`` adapters, ``rows`` rank rows in all (``fixed``: ``max_rank`` rows per
    slot, slot i at row ``i * max_rank``). DoRA tensors (magnitude ``[capacity, N]``, the
    detached weight norm, flags) appear with the first DoRA adapter, or with the layer when
    ``dora`` (then a DoRA adapter is written in place). ``source``: the base
    layer (its current weight is read on every use, so a replaced weight is seen) or a
    weight tensor; ``slots``: the bank's slot table."""

    def __init__(self, source: nn.Module | torch.Tensor, capacity: int, rows: int,
                 dtype: torch.dtype, max_rank: int, slots: Slots | None = None,
                 fixed: bool = False, dora: bool = False):
        # a module's weight is read on every use (a replaced one is seen), its kind once
        self._module = isinstance(source, nn.Module)
        self._source = base_layer(source) if self._module else source
        self._transposed = self._module and linear_kind(source) == CONV1D
        weight = self.weight
        n_out, k = weight.shape
        dev = weight.device
        self.fixed = fixed
        rows = capacity * max_rank if fixed else rows
        self.A = torch.zeros((rows, k), dtype=dtype, device=dev)
        self.B = torch.zeros((rows, n_out), dtype=dtype, device=dev)
        self._offset = [i * max_rank for i in range(capacity)] if fixed else [0] * capacity
        self.offsets = torch.tensor(self._offset, dtype=torch.int32, device=dev)
        self.ranks = torch.zeros(capacity, dtype=torch.int32, device=dev)
        self.scales = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.magnitude = self.weight_norm = self.is_dora = None
        self.max_rank = max_rank
        self.slots = slots
        self._rank = [0] * capacity  # host mirrors
        self._alloc = [0] * capacity  # rows reserved per slot (>= rank)
        self._scale = [0.0] * capacity
        self._dora = [False] * capacity
        if dora:
            self._allocate_dora()
        self._free: list[tuple[int, int]] = [(0, rows)] if rows and not fixed else []
        self._norm_stamp: Stamped | None = None
        self.plans = MultiPlans()  # decode calls' launch plans (fastlora.serve)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight ``[N, K]`` (a transformers ``Conv1D``'s as a transposed view)."""
        if not self._module:
            return self._source
        weight = self._source.weight
        return weight.t() if self._transposed else weight

    # ------------------------------------------------------------ storage

    @property
    def capacity(self) -> int:
        return len(self._rank)

    @property
    def used_rows(self) -> int:
        """Rank rows reserved by the loaded adapters (their ranks' sum)."""
        return sum(self._alloc)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        dev = self.weight.device

        def pad(t, fill=0):
            return torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype, device=dev)])

        self.offsets, self.ranks, self.scales = pad(self.offsets), pad(self.ranks), pad(self.scales)
        if self.magnitude is not None:
            self.magnitude, self.weight_norm = pad(self.magnitude, 1), pad(self.weight_norm, 1)
            self.is_dora = pad(self.is_dora, False)
        for host in (self._offset, self._rank, self._alloc):
            host.extend([0] * extra)
        self._scale.extend([0.0] * extra)
        self._dora.extend([False] * extra)

    def _take_rows(self, r: int) -> int:
        """First-fit ``r`` free rows; repack (into twice the capacity if needed) when none fit."""
        for i, (start, length) in enumerate(self._free):
            if length >= r:
                self._free[i:i + 1] = [(start + r, length - r)] if length > r else []
                return start
        used = sum(self._alloc)
        rows = self.A.shape[0]
        self._repack(rows if rows - used >= r else max(2 * rows, used + r, 16))
        return self._take_rows(r)

    def _release_rows(self, start: int, length: int) -> None:
        if length and not self.fixed:
            spans = sorted(self._free + [(start, length)])
            merged = [spans[0]]
            for s, n in spans[1:]:
                if merged[-1][0] + merged[-1][1] == s:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((s, n))
            self._free = merged

    def _repack(self, rows: int) -> None:
        """Copy the live adapters to the front of new ``[rows, *]`` tensors."""
        A = self.A.new_zeros((rows, self.A.shape[1]))
        B = self.B.new_zeros((rows, self.B.shape[1]))
        at = 0
        for slot in sorted(range(self.capacity), key=lambda i: self._offset[i]):
            n, off = self._alloc[slot], self._offset[slot]
            if n:
                A[at:at + n] = self.A[off:off + n]
                B[at:at + n] = self.B[off:off + n]
                self._offset[slot] = at
                at += n
        self.A, self.B = A, B
        self._free = [(at, rows - at)] if rows > at else []
        self.offsets.copy_(torch.tensor(self._offset, dtype=torch.int32))

    # ------------------------------------------------------------ adapters

    def check(self, who: str, A: torch.Tensor, B: torch.Tensor, scale,
              magnitude: torch.Tensor | None) -> float:
        """Raise if the adapter does not fit this layer (shapes, rank, dtypes, device) or holds
        NaN / Inf (as ``fastlora.io`` refuses them) or a scale beyond float32 (the kernels'
        scale dtype); returns the scale as a float. ``who`` names the adapter (and layer)."""
        from ..io.finite import check_finite, finite_number

        n_out, k = self.weight.shape
        for what, t in (("A", A), ("B", B), ("magnitude", magnitude)):
            if t is None:
                continue
            if not t.is_floating_point():
                raise TypeError(f"{who}: {what} has dtype {t.dtype}, not float")
            if t.device.type != "cpu" and t.device != self.weight.device:
                raise ValueError(f"{who}: {what} is on {t.device}, the bank on "
                                 f"{self.weight.device}")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != k or B.shape[0] != n_out or B.shape[1] != A.shape[0]:
            raise ValueError(f"{who}: A {list(A.shape)} and B {list(B.shape)} do not "
                             f"fit the base layer [{n_out}, {k}]: expected A [r, {k}] and B [{n_out}, r]")
        if A.shape[0] < 1:
            raise ValueError(f"{who}: rank 0")
        if self.max_rank and A.shape[0] > self.max_rank:
            raise ValueError(f"{who}: rank {A.shape[0]} exceeds the bank's "
                             f"max_rank={self.max_rank}")
        if magnitude is not None and tuple(magnitude.shape) != (n_out,):
            raise ValueError(f"{who}: DoRA magnitude {list(magnitude.shape)}, "
                             f"expected [{n_out}]")
        scale = finite_number(scale, f"{who}: scale")
        if abs(scale) > FLOAT32_MAX:
            raise ValueError(f"{who}: scale {scale:g} is beyond float32's "
                             "range (the kernels' scale dtype)")
        for what, t in (("A", A), ("B", B), ("magnitude", magnitude)):
            if t is not None:
                check_finite(t.detach(), f"{who}: {what}")
        return scale

    def write(self, slot: int, t: LayerTensors, non_blocking: bool = False) -> None:
        """Put one checked layer of an adapter in ``slot``, in place (``non_blocking``: copies
        from pinned CPU memory overlap the host)."""
        r = t.A.shape[0]
        if self.fixed:
            self._alloc[slot] = r
        else:
            if r > self._alloc[slot]:
                self.clear(slot)
                self._offset[slot], self._alloc[slot] = self._take_rows(r), r
            self._release_rows(self._offset[slot] + r, self._alloc[slot] - r)  # a smaller one
            self._alloc[slot] = r
        off = self._offset[slot]
        with torch.no_grad():
            self.A[off:off + r].copy_(t.A, non_blocking=non_blocking)
            self.B[off:off + r].copy_(t.BT, non_blocking=non_blocking)
        self._rank[slot], self._scale[slot] = r, t.scale
        self._write_meta(slot)
        if t.magnitude is not None:
            if self.magnitude is None:
                self._allocate_dora()
            self._refresh_norms()
            with torch.no_grad():
                self.magnitude[slot].copy_(t.magnitude, non_blocking=non_blocking)
                self.weight_norm[slot] = self._norm(slot)
            self.is_dora[slot] = True
        elif self.is_dora is not None:
            self.is_dora[slot] = False
            self.weight_norm[slot] = 1.0
        self._dora[slot] = t.magnitude is not None

    def _allocate_dora(self) -> None:
        """The DoRA tensors: magnitude ``[capacity, N]`` (bank dtype, 1), the weight norm
        ``[capacity, N]`` (fp32, 1), ``is_dora`` ``[capacity]`` (bool, False)."""
        dev, shape = self.A.device, (self.capacity, self.B.shape[1])
        self.magnitude = torch.ones(shape, dtype=self.A.dtype, device=dev)
        self.weight_norm = torch.ones(shape, device=dev)
        self.is_dora = torch.zeros(self.capacity, dtype=torch.bool, device=dev)

    def clear(self, slot: int) -> None:
        """Empty ``slot`` (rank 0: base only) and free its rows."""
        self._release_rows(self._offset[slot], self._alloc[slot])
        if not self.fixed:
            self._offset[slot] = 0
        self._rank[slot] = self._alloc[slot] = 0
        self._scale[slot] = 0.0
        self._dora[slot] = False
        self._write_meta(slot)
        if self.is_dora is not None:
            self.is_dora[slot] = False
            self.weight_norm[slot] = 1.0

    def _write_meta(self, slot: int) -> None:
        """The slot's offset (constant in a fixed bank), rank and scale on the device (fills,
        no host-to-device copy)."""
        if not self.fixed:
            self.offsets[slot] = self._offset[slot]
        self.ranks[slot] = self._rank[slot]
        self.scales[slot] = self._scale[slot]

    def _norm(self, slot: int) -> torch.Tensor:
        off, r = self._offset[slot], self._rank[slot]
        return dora_weight_norm(self.weight, self.A[off:off + r], self.B[off:off + r].t(),
                                self._scale[slot])

    def _refresh_norms(self, force: bool = False) -> None:
        """Recompute the DoRA norms if the base weight changed (the rule of
        ``fastlora.ops.cache``), or always with ``force``."""
        weight = self.weight
        if force or self._norm_stamp is None or not self._norm_stamp.valid_for((weight,), None):
            with torch.no_grad():
                for slot in range(self.capacity):
                    if self._dora[slot]:
                        self.weight_norm[slot] = self._norm(slot)
            self._norm_stamp = Stamped((weight,), None, None)

    @property
    def live(self) -> bool:
        """Whether some adapter covers this layer (a rank above 0)."""
        return any(self._rank)

    def packed(self) -> PackedAdapters:
        """The layer's adapters for ``fastlora.multi_lora_linear`` (views of the storage).
        DoRA norms are recomputed if the base weight changed since they were computed."""
        if self.is_dora is not None and not torch.compiler.is_compiling():
            self._refresh_norms()
        return PackedAdapters(self.A, self.B, self.offsets, self.ranks, self.scales,
                              self.max_rank or max(self._rank + [1]), self.magnitude,
                              self.weight_norm, self.is_dora, slots=self.slots)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every tensor of the layer's storage (the DoRA ones None until allocated)."""
        return tuple(getattr(self, name) for name in _STORAGE)

    def layout(self) -> LayerLayout:
        """What a forward over this layer captured in a CUDA graph bakes in: the kernels'
        rank bound, then the address, dtype and shape of each of ``tensors()`` (None: not
        allocated). Writes in place keep it; ``grow``, a repack and the first DoRA adapter
        (without ``dora``) change it."""
        return LayerLayout(self.max_rank or max(self._rank + [1]),
                           *(None if t is None else (t.data_ptr(), t.dtype, tuple(t.shape))
                             for t in self.tensors()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def __repr__(self) -> str:
        ranks = {slot: r for slot, r in enumerate(self._rank) if r}
        dora = sum(self._dora)
        return (f"LayerBank(weight [{', '.join(map(str, self.weight.shape))}], {len(ranks)} adapters "
                f"(rank by slot: {ranks}){f', {dora} DoRA' if dora else ''}, rows {self.used_rows}/"
                f"{self.A.shape[0]}, slots {self.capacity}, {str(self.A.dtype).removeprefix('torch.')} "
                f"on {self.A.device})")


def _weight_of(source: nn.Module | torch.Tensor) -> torch.Tensor:
    return layer_weight(source) if isinstance(source, nn.Module) else source


def base_layer(module: nn.Module) -> nn.Module:
    """The layer a LoRA wrapper (PEFT's ``lora.Linear``: ``get_base_layer``) adapts, else
    ``module`` itself: adapters bind to base layers, as ``fastlora.io`` resolves them."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def layer_weight(module: nn.Module) -> torch.Tensor | None:
    """``[N, K]`` weight of a dense linear layer (``fastlora.nn.layers``: an ``nn.Linear``, or a
    transformers ``Conv1D`` as a transposed view), seen through a LoRA wrapper; None for
    any other module (a bitsandbytes 4-bit layer included)."""
    module = base_layer(module)
    kind = linear_kind(module)
    if kind == LINEAR:
        return module.weight
    if kind == CONV1D:
        return module.weight.t()
    return None


def _not_served(module: nn.Module) -> str | None:
    """Why a bank cannot serve ``module``'s layer (None: it can)."""
    if layer_weight(module) is not None:
        return None
    cls = type(base_layer(module))
    what = f"a {cls.__module__}.{cls.__qualname__}"
    if linear_kind(base_layer(module)) == BNB_4BIT:
        return (f"{what}, a bitsandbytes 4-bit layer: an AdapterBank serves dense weights "
                "(multi_lora_linear reads no 4-bit weight; lora_linear, dora_linear and "
                "patched PEFT layers do)")
    return f"{what}, not an nn.Linear or a transformers Conv1D"


class AdapterBank(Refreshable):
    """Named adapters for a model's linear layers (or one layer), packed per layer.

    ``base``: a model (adapters bind to its ``nn.Linear`` / ``Conv1D`` modules by name, as
    ``fastlora.io.load_adapter(..., base_model=model)`` resolves them; in a PEFT model, to
    the base layers of its LoRA layers), an ``nn.Linear``, or a weight ``[N, K]`` (a
    one-layer bank, layer name ``""``). Adapter tensors are cast to ``dtype`` (default: the
    base weight's) and copied to the base's device. ``capacity``: initial adapter slots
    (doubled when full); ``rows``: initial rank rows per layer (doubled as needed, so memory
    follows the adapters' real sizes); ``max_rank``: the largest rank allowed (None: grows
    with the adapters; fixing it keeps ``torch.compile`` graphs valid when adapters change).
    ``fixed=True`` (needs ``max_rank``): ``capacity`` slots of ``max_rank`` rows each,
    allocated up front, never moved or grown; loading into a full bank raises.
    ``dora=True``: every layer's DoRA tensors are allocated with the layer (memory for
    ``capacity`` magnitudes and norms per layer, and the DoRA epilogue in every call), so
    that a first DoRA adapter is written in place instead of allocating them: a CUDA graph
    captured before it stays valid (``layout()``).
    """

    def __init__(self, base: nn.Module | torch.Tensor, *, dtype: torch.dtype | None = None,
                 capacity: int = 8, rows: int = 0, max_rank: int | None = None,
                 fixed: bool = False, dora: bool = False):
        if isinstance(base, torch.Tensor) or (isinstance(base, nn.Module)
                                              and layer_weight(base) is not None):
            self._model, self._targets = None, {"": base}
        elif isinstance(base, nn.Module):
            if linear_kind(base_layer(base)) == BNB_4BIT:  # a layer, not a model
                raise ValueError(f"AdapterBank cannot serve this layer: it is {_not_served(base)}")
            self._model = base
            self._targets = None
        else:
            raise TypeError(f"AdapterBank needs a model, an nn.Linear or a weight tensor, got "
                            f"{type(base).__name__}")
        weight = _weight_of(next(iter(self._targets.values()))) if self._targets else None
        if weight is not None and weight.dim() != 2:
            raise ValueError(f"base weight must be [N, K], got {list(weight.shape)}")
        if dtype is None and weight is None:  # a model: its first float parameter's dtype
            dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
            if dtype is None:
                raise TypeError("AdapterBank: the model has no floating-point parameter; "
                                "pass dtype=")
        self.dtype = dtype or weight.dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"AdapterBank dtype must be a float dtype, got {self.dtype}")
        if fixed and not max_rank:
            raise ValueError("AdapterBank(fixed=True) needs max_rank (the rows of every slot)")
        self.capacity, self.rows, self.max_rank, self.fixed = capacity, rows, max_rank, fixed
        self.dora = dora
        self.layers: dict[str, LayerBank] = {}
        self.slots = Slots(capacity, self._device())
        self._covers: dict[str, list[str]] = {}  # adapter -> layers it holds

    @property
    def device(self) -> torch.device:
        return self._device()

    @property
    def model(self) -> nn.Module | None:
        """The model whose layers the bank serves (None for a one-layer bank)."""
        return self._model

    # ------------------------------------------------------------ names

    @property
    def names(self) -> list[str]:
        """Loaded adapters, in slot order."""
        return [a for a in self.slots.names if a is not None]

    def __contains__(self, name: str) -> bool:
        return name in self._covers

    def __len__(self) -> int:
        return len(self._covers)

    def __getitem__(self, layer: str) -> LayerBank:
        """The bank of one base layer (module name); a layer no adapter covers has an empty one."""
        if layer not in self.layers:
            weight = self._weight(layer)
            bank = LayerBank(weight, self.capacity, self.rows, self.dtype, self.max_rank or 0,
                             self.slots, self.fixed, self.dora)
            self.layers[layer] = bank
        return self.layers[layer]

    def slot(self, name: str) -> int:
        """The slot (index in ``multi_lora_linear``'s adapter_index) of adapter ``name``."""
        if name in self._covers:
            return self.slots.names.index(name)
        loaded = ", ".join(self.names) or "none"
        raise KeyError(f"unknown adapter {name!r} (loaded: {loaded})")

    def index(self, names: Iterable[str | None], device=None) -> Routing:
        """The routing of a batch: one entry per name (per sequence of x ``[B, T, K]``, or
        per row; ``None`` or ``"__base__"``: the base layer). It records the generations of
        the adapters it uses: a layer refuses it once one of them is unloaded or replaced."""
        slots = {a: i for i, a in enumerate(self.slots.names) if a is not None}

        def slot_of(name):
            return slots[name] if name in slots else self.slot(name)

        return Routing.from_names(names, slot_of, self.capacity, device or self._device(),
                                  slots=self.slots)

    def static_index(self, entries: int, rows: int | None = None) -> Routing:
        """A routing over fixed buffers for batches of ``rows`` rows (default ``entries``),
        for CUDA graphs: ``assign(routing, names)`` rewrites it in place between replays."""
        return Routing.static(entries, rows or entries, self.capacity, self._device(),
                              slots=self.slots)

    def assign(self, routing: Routing, names) -> None:
        """Give a static routing of this bank a new batch, in place: names (as ``index``)
        or an integer tensor of slots."""
        routing.assign(names if isinstance(names, torch.Tensor) else list(names), self.slot)

    def packed(self, layer: str = ""):
        """``self[layer].packed()``: lets a one-layer bank go straight to ``multi_lora_linear``."""
        if self._model is not None and layer == "":
            raise ValueError("this bank serves a model: pass bank[module_name] to multi_lora_linear")
        return self[layer].packed()

    # ------------------------------------------------------------ loading

    def prepare(self, name: str, source, *, pin: bool = False) -> Prepared:
        """Read adapter ``name`` (a PEFT directory, an adapter file, a state dict, a
        ``fastlora.io.Adapter``, or ``{layer: (A, B, scale, magnitude)}`` tensors) and check
        it against this bank (shapes, ranks, finite values); tensors in the bank's dtype,
        where they were (``pin``: in pinned CPU memory, for ``put(..., non_blocking=True)``
        from CUDA). Nothing is written."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"invalid adapter name {name!r}")
        layers = self._read(name, source)
        if not layers:
            raise ValueError(f"adapter {name!r} has no layers")
        out = {}
        for target, (A, B, scale, magnitude) in layers.items():
            who = f"adapter {name!r}" + (f" layer {target!r}" if target else "")
            scale = self[target].check(who, A, B, scale, magnitude)

            def ready(t):
                t = t.detach().to(self.dtype)
                return t.cpu().pin_memory() if pin else t

            out[target] = LayerTensors(ready(A), ready(B.t().contiguous()), scale,
                                       ready(magnitude) if magnitude is not None else None)
        return Prepared(name, out)

    def _read(self, name: str, source) -> dict:
        """``{layer: (A, B, scale, magnitude)}`` of ``source`` (as ``prepare`` takes it)."""
        from ..io import Adapter, load_adapter

        if isinstance(source, dict) and all(isinstance(v, tuple) for v in source.values()):
            return source
        if isinstance(source, (str, os.PathLike, dict)):
            adapter = load_adapter(source, base_model=self._model)
        elif isinstance(source, Adapter):
            adapter = source
        else:
            raise TypeError(f"cannot load an adapter from a {type(source).__name__}")
        layers = {}
        for layer_name, layer in adapter.layers.items():
            target = "" if self._model is None else layer_name
            if self._model is None and len(adapter.layers) != 1:
                raise ValueError(f"adapter {name!r} has {len(adapter.layers)} layers; this bank "
                                 "serves one layer")
            if getattr(layer, "kind", "lora") != "lora":
                raise ValueError(f"adapter {name!r}: layer {layer_name!r} is a {layer.kind} layer; "
                                 "turn it into LoRA first (fastlora.io.to_lora)")
            if layer.is_conv:
                raise ValueError(f"adapter {name!r}: layer {layer_name!r} is a convolution; "
                                 "the bank holds linear layers")
            if layer.bias is not None:
                raise ValueError(f"adapter {name!r}: layer {layer_name!r} has a lora_B bias, "
                                 "which multi-adapter batches do not support")
            layers[target] = (layer.A, layer.B, layer.scale, layer.magnitude)
        return layers

    def load(self, name: str, source, *, replace: bool = False) -> int:
        """Load adapter ``name`` from a PEFT directory, an adapter file, a state dict or a
        ``fastlora.io.Adapter``; returns its index. ``replace=True`` overwrites a loaded
        adapter of that name in place (same index, a new generation: routings made before
        refuse it). Checks everything before writing."""
        return self.put(self.prepare(name, source), replace=replace)

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float,
            magnitude: torch.Tensor | None = None, *, layer: str = "", replace: bool = False) -> int:
        """Add one layer's adapter from tensors (A ``[r, K]``, B ``[N, r]``, magnitude ``[N]``
        for DoRA); for a model bank, ``layer`` names the module. Returns the index."""
        return self.load(name, {layer: (A, B, scale, magnitude)}, replace=replace)

    def put(self, adapter: Prepared, *, replace: bool = False, non_blocking: bool = False) -> int:
        """Write a prepared adapter into a free slot (or, with ``replace``, over the adapter
        of that name); returns its slot. ``non_blocking``: copies from pinned memory run
        asynchronously on the current stream."""
        name = adapter.name
        if name in self._covers and not replace:
            raise ValueError(f"adapter {name!r} is already loaded; pass replace=True to replace it")
        if name in self._covers:
            slot = self.slot(name)
            for stale in set(self._covers[name]) - set(adapter.layers):
                self.layers[stale].clear(slot)
        else:
            slot = self._free_slot(name)
        for target, tensors in adapter.layers.items():
            self[target].write(slot, tensors, non_blocking)
        self._covers[name] = list(adapter.layers)
        self.slots.fill(slot, name)
        return slot

    def unload(self, name: str) -> None:
        """Remove adapter ``name``; its index becomes free for the next load (routings that
        use it are refused from now on)."""
        slot = self.slot(name)
        for layer in self._covers.pop(name):
            self.layers[layer].clear(slot)
        self.slots.empty(slot)

    def _free_slot(self, name: str) -> int:
        free = next((i for i, a in enumerate(self.slots.names) if a is None), None)
        if free is None:
            if self.fixed:
                raise RuntimeError(f"cannot load adapter {name!r}: all {self.capacity} slots of "
                                   "this fixed bank are in use (unload one first)")
            free = self.capacity
            self.capacity *= 2
            for bank in self.layers.values():
                bank.grow(self.capacity)
            self.slots.grow(self.capacity)
        return free

    def _weight(self, layer: str) -> nn.Module | torch.Tensor:
        """The base layer (or weight) of ``layer``, as ``LayerBank`` takes it."""
        if self._targets is not None:
            if layer not in self._targets:
                raise KeyError(f"this bank serves one layer (named ''), not {layer!r}")
            return self._targets[layer]
        try:
            module = self._model.get_submodule(layer)
        except AttributeError:
            raise KeyError(f"the model has no module {layer!r}") from None
        why = _not_served(module)
        if why is not None:
            raise ValueError(f"module {layer!r} is {why}")
        return base_layer(module)

    def _device(self) -> torch.device:
        if self._targets is not None:
            return _weight_of(next(iter(self._targets.values()))).device
        return next(self._model.parameters()).device

    def layout(self) -> tuple:
        """What a forward over this bank captured in a CUDA graph bakes in: ``(capacity,
        ((layer name, LayerBank.layout()), ...))`` over the layers some adapter covers (the
        others run the base layer alone: ``serve.attach``). It changes only inside ``put``,
        ``unload`` and growth, each of which also changes ``slots.version``: a caller may
        recompute it only when that version moved."""
        return (self.capacity, tuple((name, layer.layout()) for name, layer in self.layers.items()
                                     if layer.live))

    def nbytes(self) -> int:
        """Bytes held by all layer banks."""
        return sum(bank.nbytes() for bank in self.layers.values())

    def refresh(self) -> None:
        """Recompute every layer's DoRA norms now. Base-weight changes are otherwise detected
        by the rule of ``fastlora.ops.cache``; this is for writes it cannot see
        (``weight.data.copy_(t)``). ``fastlora.refresh(bank)`` calls it."""
        for bank in self.layers.values():
            if bank.is_dora is not None:
                bank._refresh_norms(force=True)

    def __repr__(self) -> str:
        from ..io.summary import size_text

        served = "a model" if self._model is not None else "one layer"
        return (f"AdapterBank({len(self)} adapters {self.names} over {len(self.layers)} layers of {served}, "
                f"{str(self.dtype).removeprefix('torch.')} on {self._device()}, {self.capacity} slots, "
                f"max_rank={self.max_rank}, {size_text(self.nbytes())})")
