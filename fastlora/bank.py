"""``AdapterBank``: many LoRA / DoRA adapters resident at once, for per-row adapter batches.

One bank serves a model (or a single layer): adapters are loaded by name (from a PEFT
directory, a ``.safetensors`` file, a state dict or a ``fastlora.io.Adapter``), unloaded,
or replaced at run time; ``bank.index(names)`` gives the per-row index tensor of
``fastlora.multi_lora_linear``, and ``bank[module_name]`` the layer's :class:`LayerBank`.

Layout (per base layer): adapters are packed along the rank, not stacked and padded to the
largest rank: adapter i owns rows ``offsets[i] .. offsets[i] + ranks[i]`` of ``A [S, K]``
and ``B [S, N]`` (lora_B transposed). A stacked ``[n, R_max, K]`` layout wastes
``(R_max - r) / R_max`` of its memory on every smaller adapter (7/8 for a rank-8 adapter
next to rank-64 ones) and invites the kernels to compute on the padding; packed rows cost
the real ranks in memory and in the kernels. Storage has a fixed capacity (adapter slots
and rows) written in place, so replacing an adapter keeps tensor addresses (CUDA graphs,
no recompilation); when an adapter does not fit, the layer repacks into tensors of twice
the capacity (new addresses: recapture graphs; reserve capacity up front to avoid it).
Freed rows are reused first-fit. An adapter's index (slot) is shared by all layers; a
layer an adapter does not cover holds rank 0 for it (the base only, as PEFT).
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from .cache import Stamped
from .functional import dora_weight_norm
from .adapters import PackedAdapters

__all__ = ["AdapterBank", "LayerBank"]

BASE = "__base__"


class LayerBank:
    """One base layer's adapters (weight ``[N, K]``), packed along the rank in fixed-capacity
    storage: ``slots`` adapters, ``rows`` rank rows in all. DoRA tensors (magnitude
    ``[slots, N]``, the detached weight norm, flags) appear with the first DoRA adapter.
    ``source``: the base layer (its current weight is read on every use, so a replaced
    weight is seen) or a weight tensor."""

    def __init__(self, source: nn.Module | torch.Tensor, slots: int, rows: int,
                 dtype: torch.dtype, max_rank: int):
        self._source = source
        weight = self.weight
        n_out, k = weight.shape
        dev = weight.device
        self.A = torch.zeros((rows, k), dtype=dtype, device=dev)
        self.B = torch.zeros((rows, n_out), dtype=dtype, device=dev)
        self.offsets = torch.zeros(slots, dtype=torch.int32, device=dev)
        self.ranks = torch.zeros(slots, dtype=torch.int32, device=dev)
        self.scales = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.magnitude = self.weight_norm = self.is_dora = None
        self.max_rank = max_rank
        self._offset = [0] * slots  # host mirrors
        self._rank = [0] * slots
        self._alloc = [0] * slots  # rows reserved per slot (>= rank)
        self._scale = [0.0] * slots
        self._dora = [False] * slots
        self._free: list[tuple[int, int]] = [(0, rows)] if rows else []  # (start, length)
        self._norm_stamp: Stamped | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The base weight ``[N, K]``."""
        return _weight_of(self._source)

    # ------------------------------------------------------------ storage

    @property
    def slots(self) -> int:
        return len(self._rank)

    @property
    def used_rows(self) -> int:
        """Rank rows reserved by the loaded adapters (their ranks' sum)."""
        return sum(self._alloc)

    def grow_slots(self, slots: int) -> None:
        extra = slots - self.slots
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
        if length:
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
        for slot in sorted(range(self.slots), key=lambda i: self._offset[i]):
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

    def check(self, name: str, A: torch.Tensor, B: torch.Tensor,
              magnitude: torch.Tensor | None, where: str) -> None:
        """Raise if the adapter does not fit this layer (shapes, rank, dtypes, device)."""
        n_out, k = self.weight.shape
        for what, t in (("A", A), ("B", B), ("magnitude", magnitude)):
            if t is None:
                continue
            if not t.is_floating_point():
                raise TypeError(f"adapter {name!r} {where}: {what} has dtype {t.dtype}, not float")
            if t.device.type != "cpu" and t.device != self.weight.device:
                raise ValueError(f"adapter {name!r} {where}: {what} is on {t.device}, the bank on "
                                 f"{self.weight.device}")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != k or B.shape[0] != n_out or B.shape[1] != A.shape[0]:
            raise ValueError(f"adapter {name!r} {where}: A {list(A.shape)} and B {list(B.shape)} do not "
                             f"fit the base layer [{n_out}, {k}]: expected A [r, {k}] and B [{n_out}, r]")
        if A.shape[0] < 1:
            raise ValueError(f"adapter {name!r} {where}: rank 0")
        if self.max_rank and A.shape[0] > self.max_rank:
            raise ValueError(f"adapter {name!r} {where}: rank {A.shape[0]} exceeds the bank's "
                             f"max_rank={self.max_rank}")
        if magnitude is not None and tuple(magnitude.shape) != (n_out,):
            raise ValueError(f"adapter {name!r} {where}: DoRA magnitude {list(magnitude.shape)}, "
                             f"expected [{n_out}]")

    def write(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float,
              magnitude: torch.Tensor | None = None) -> None:
        """Put an adapter (A ``[r, K]``, B ``[N, r]``, its scale, optional DoRA magnitude
        ``[N]``) in ``slot``, in place; tensors are cast to the bank's dtype and device."""
        r = A.shape[0]
        if r > self._alloc[slot]:
            self.clear(slot)
            self._offset[slot], self._alloc[slot] = self._take_rows(r), r
        off = self._offset[slot]
        self._release_rows(off + r, self._alloc[slot] - r)  # a smaller replacement
        self._alloc[slot] = r
        with torch.no_grad():
            self.A[off:off + r] = A.detach()
            self.B[off:off + r] = B.detach().t()
        self._rank[slot], self._scale[slot] = r, float(scale)
        self._sync_meta()
        if magnitude is not None:
            if self.magnitude is None:
                dev = self.weight.device
                self.magnitude = torch.ones((self.slots, self.B.shape[1]), dtype=self.A.dtype, device=dev)
                self.weight_norm = torch.ones((self.slots, self.B.shape[1]), device=dev)
                self.is_dora = torch.zeros(self.slots, dtype=torch.bool, device=dev)
            self._refresh_norms()
            with torch.no_grad():
                self.magnitude[slot] = magnitude.detach()
                self.weight_norm[slot] = self._norm(slot)
            self.is_dora[slot] = True
        elif self.is_dora is not None:
            self.is_dora[slot] = False
            self.weight_norm[slot] = 1.0
        self._dora[slot] = magnitude is not None

    def clear(self, slot: int) -> None:
        """Empty ``slot`` (rank 0: base only) and free its rows."""
        self._release_rows(self._offset[slot], self._alloc[slot])
        self._offset[slot] = self._rank[slot] = self._alloc[slot] = 0
        self._scale[slot] = 0.0
        self._dora[slot] = False
        self._sync_meta()
        if self.is_dora is not None:
            self.is_dora[slot] = False
            self.weight_norm[slot] = 1.0

    def _sync_meta(self) -> None:
        self.offsets.copy_(torch.tensor(self._offset, dtype=torch.int32))
        self.ranks.copy_(torch.tensor(self._rank, dtype=torch.int32))
        self.scales.copy_(torch.tensor(self._scale, dtype=torch.float32))

    def _norm(self, slot: int) -> torch.Tensor:
        off, r = self._offset[slot], self._rank[slot]
        return dora_weight_norm(self.weight, self.A[off:off + r], self.B[off:off + r].t(),
                                self._scale[slot])

    def _refresh_norms(self, force: bool = False) -> None:
        """Recompute the DoRA norms if the base weight changed (the rule of
        ``fastlora.cache``), or always with ``force``."""
        weight = self.weight
        if force or self._norm_stamp is None or not self._norm_stamp.valid_for((weight,), None):
            with torch.no_grad():
                for slot in range(self.slots):
                    if self._dora[slot]:
                        self.weight_norm[slot] = self._norm(slot)
            self._norm_stamp = Stamped((weight,), None, None)

    def packed(self) -> PackedAdapters:
        """The layer's adapters for ``fastlora.multi_lora_linear`` (views of the storage).
        DoRA norms are recomputed if the base weight changed since they were computed."""
        if self.is_dora is not None and not torch.compiler.is_compiling():
            self._refresh_norms()
        return PackedAdapters(self.A, self.B, self.offsets, self.ranks, self.scales,
                              self.max_rank or max(self._rank + [1]), self.magnitude,
                              self.weight_norm, self.is_dora)

    def nbytes(self) -> int:
        tensors = [self.A, self.B, self.offsets, self.ranks, self.scales, self.magnitude,
                   self.weight_norm, self.is_dora]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __repr__(self) -> str:
        ranks = {slot: r for slot, r in enumerate(self._rank) if r}
        dora = sum(self._dora)
        return (f"LayerBank(weight [{', '.join(map(str, self.weight.shape))}], {len(ranks)} adapters "
                f"(rank by slot: {ranks}){f', {dora} DoRA' if dora else ''}, rows {self.used_rows}/"
                f"{self.A.shape[0]}, slots {self.slots}, {str(self.A.dtype).removeprefix('torch.')} "
                f"on {self.A.device})")


def _weight_of(source: nn.Module | torch.Tensor) -> torch.Tensor:
    return _layer_weight(source) if isinstance(source, nn.Module) else source


def _layer_weight(module: nn.Module) -> torch.Tensor | None:
    """``[N, K]`` weight of a Linear (or transformers Conv1D, as a transposed view)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    return None


class AdapterBank:
    """Named adapters for a model's linear layers (or one layer), packed per layer.

    ``base``: a model (adapters bind to its ``nn.Linear`` / ``Conv1D`` modules by name, as
    ``fastlora.io.load_adapter(..., base_model=model)`` resolves them), an ``nn.Linear``, or
    a weight ``[N, K]`` (a one-layer bank, layer name ``""``). Adapter tensors are cast to
    ``dtype`` (default: the base weight's) and copied to the base's device. ``capacity``:
    initial adapter slots (doubled when full); ``rows``: initial rank rows per layer
    (doubled as needed, so memory follows the adapters' real sizes);
    ``max_rank``: the largest rank allowed (None: grows with the adapters; fixing it keeps
    ``torch.compile`` graphs valid when adapters change).
    """

    def __init__(self, base: nn.Module | torch.Tensor, *, dtype: torch.dtype | None = None,
                 capacity: int = 8, rows: int = 0, max_rank: int | None = None):
        if isinstance(base, torch.Tensor):
            self._model, self._targets = None, {"": base}
        elif _layer_weight(base) is not None:
            self._model, self._targets = None, {"": base}
        elif isinstance(base, nn.Module):
            self._model = base
            self._targets = None
        else:
            raise TypeError(f"AdapterBank needs a model, an nn.Linear or a weight tensor, got "
                            f"{type(base).__name__}")
        weight = _weight_of(next(iter(self._targets.values()))) if self._targets else None
        if weight is not None and weight.dim() != 2:
            raise ValueError(f"base weight must be [N, K], got {list(weight.shape)}")
        self.dtype = dtype or (weight.dtype if weight is not None else next(base.parameters()).dtype)
        if not self.dtype.is_floating_point:
            raise TypeError(f"AdapterBank dtype must be a float dtype, got {self.dtype}")
        self.capacity, self.rows, self.max_rank = capacity, rows, max_rank
        self.layers: dict[str, LayerBank] = {}
        self._slots: dict[str, int] = {}
        self._covers: dict[str, list[str]] = {}  # adapter -> layers it holds

    # ------------------------------------------------------------ names

    @property
    def names(self) -> list[str]:
        """Loaded adapters, in slot order."""
        return sorted(self._slots, key=self._slots.get)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, layer: str) -> LayerBank:
        """The bank of one base layer (module name); a layer no adapter covers has an empty one."""
        if layer not in self.layers:
            weight = self._weight(layer)
            bank = LayerBank(weight, self.capacity, self.rows, self.dtype, self.max_rank or 0)
            self.layers[layer] = bank
        return self.layers[layer]

    def slot(self, name: str) -> int:
        """The index of adapter ``name`` in ``multi_lora_linear``'s adapter_index."""
        try:
            return self._slots[name]
        except KeyError:
            loaded = ", ".join(self.names) or "none"
            raise KeyError(f"unknown adapter {name!r} (loaded: {loaded})") from None

    def index(self, names: Iterable[str | None], device=None) -> torch.Tensor:
        """int32 indices for ``names`` (``None`` or ``"__base__"``: -1, the base layer)."""
        idx = [-1 if a is None or a == BASE else self.slot(a) for a in names]
        return torch.tensor(idx, dtype=torch.int32, device=device or self._device())

    def packed(self, layer: str = ""):
        """``self[layer].packed()``: lets a one-layer bank go straight to ``multi_lora_linear``."""
        if self._model is not None and layer == "":
            raise ValueError("this bank serves a model: pass bank[module_name] to multi_lora_linear")
        return self[layer].packed()

    # ------------------------------------------------------------ loading

    def load(self, name: str, source, *, replace: bool = False) -> int:
        """Load adapter ``name`` from a PEFT directory, an adapter file, a state dict or a
        ``fastlora.io.Adapter``; returns its index. ``replace=True`` overwrites a loaded
        adapter of that name in place (same index). Checks everything before writing."""
        from .io import Adapter, load_adapter

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
            if layer.is_conv:
                raise ValueError(f"adapter {name!r}: layer {layer_name!r} is a convolution; "
                                 "the bank holds linear layers")
            if layer.bias is not None:
                raise ValueError(f"adapter {name!r}: layer {layer_name!r} has a lora_B bias, "
                                 "which multi-adapter batches do not support")
            layers[target] = (layer.A, layer.B, layer.scale, layer.magnitude)
        return self._put(name, layers, replace)

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float,
            magnitude: torch.Tensor | None = None, *, layer: str = "", replace: bool = False) -> int:
        """Add one layer's adapter from tensors (A ``[r, K]``, B ``[N, r]``, magnitude ``[N]``
        for DoRA); for a model bank, ``layer`` names the module. Returns the index."""
        return self._put(name, {layer: (A, B, scale, magnitude)}, replace)

    def unload(self, name: str) -> None:
        """Remove adapter ``name``; its index becomes free for the next load."""
        slot = self.slot(name)
        for layer in self._covers.pop(name):
            self.layers[layer].clear(slot)
        del self._slots[name]

    def _put(self, name: str, layers: dict, replace: bool) -> int:
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self._slots and not replace:
            raise ValueError(f"adapter {name!r} is already loaded; pass replace=True to replace it")
        if not layers:
            raise ValueError(f"adapter {name!r} has no layers")
        for target, (A, B, _, magnitude) in layers.items():
            self[target].check(name, A, B, magnitude, f"layer {target!r}" if target else "")
        if name in self._slots:
            slot = self._slots[name]
            for stale in set(self._covers[name]) - set(layers):
                self.layers[stale].clear(slot)
        else:
            slot = self._free_slot()
        for target, (A, B, scale, magnitude) in layers.items():
            self[target].write(slot, A, B, scale, magnitude)
        self._slots[name] = slot
        self._covers[name] = list(layers)
        return slot

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        free = next((i for i in range(self.capacity) if i not in used), None)
        if free is None:
            free = self.capacity
            self.capacity *= 2
            for bank in self.layers.values():
                bank.grow_slots(self.capacity)
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
        if _layer_weight(module) is None:
            raise ValueError(f"module {layer!r} is a {type(module).__name__}, not a Linear")
        return module

    def _device(self) -> torch.device:
        if self._targets is not None:
            return _weight_of(next(iter(self._targets.values()))).device
        return next(self._model.parameters()).device

    def nbytes(self) -> int:
        """Bytes held by all layer banks."""
        return sum(bank.nbytes() for bank in self.layers.values())

    def refresh(self) -> None:
        """Recompute every layer's DoRA norms now. Base-weight changes are otherwise detected
        by the rule of ``fastlora.cache``; this is for writes it cannot see
        (``weight.data.copy_(t)``). ``fastlora.refresh(bank)`` calls it."""
        for bank in self.layers.values():
            if bank.is_dora is not None:
                bank._refresh_norms(force=True)

    def __repr__(self) -> str:
        from .io.summary import size_text

        served = "a model" if self._model is not None else "one layer"
        return (f"AdapterBank({len(self)} adapters {self.names} over {len(self.layers)} layers of {served}, "
                f"{str(self.dtype).removeprefix('torch.')} on {self._device()}, {self.capacity} slots, "
                f"max_rank={self.max_rank}, {size_text(self.nbytes())})")
