"""``patch(model)`` / ``unpatch(model)``: accelerate an existing PEFT LoRA model in place.

Every supported ``peft.tuners.lora.layer.Linear`` gets its ``__class__`` swapped for a
subclass (``classes``) that overrides ``forward`` (``forward``). Parameters, children,
buffers and attributes stay where PEFT put them, so state_dict keys, ``save_pretrained``,
``set_adapter``, ``add_adapter``, ``delete_adapter``, merging, ``disable_adapter()``,
``rescale_adapter_scale``, deepcopy and pickling keep working; the patched forward reads
PEFT's parameters, ``scaling`` dict, dropout modules and flags on every call. What can be
known at patch time is decided here, by the same ``reader`` the forward uses: layers it
refuses are not patched and the ``PatchReport`` says why.
"""
from __future__ import annotations

import logging
from typing import Iterable

from torch import nn

from ..ops.cache import writes_visible
from . import classes
from .classes import is_patched
from ..nn.layers import CONV1D
from ..nn.swap import original_class
from .reader import (BNB_4BIT, NotFused, adapter_names, is_dora, layer_problem, lora_tuner_class,
                     peft_lora, read_adapter, read_base)
from .report import LayerReport, PatchReport

__all__ = ["is_patched", "patch", "unpatch"]

logger = logging.getLogger("fastlora.peft")

_SHARDED = ("sharded parameters (DTensor): fused inside FSDP2's forward, where they are "
            "unsharded; PEFT's forward whenever a call still sees a DTensor (tensor parallelism)")


def _judge(name: str, layer, selected: set[str] | None) -> LayerReport:
    """What ``patch`` will do with one tuner layer, and why (changes nothing)."""
    base = getattr(layer, "base_layer", None)
    entry = LayerReport(
        name=name or type(layer).__name__,
        layer_type=original_class(layer).__name__,
        base_type=type(base).__name__ if base is not None else "-",
        adapters=adapter_names(layer), patched=False)
    problem = layer_problem(layer)
    if problem is not None:
        entry.reason = problem
        return entry
    read = read_base(layer)
    considered = [a for a in entry.adapters if selected is None or a in selected]
    if not considered:
        entry.reason = f"holds none of the selected adapters ({', '.join(sorted(selected))})"
        return entry
    sharded = False
    for r in [read] + [read_adapter(layer, a) for a in considered]:
        if isinstance(r, NotFused):
            if not r.sharded:
                entry.reason = r.reason
                return entry
            sharded = True
    entry.patched = True
    if not isinstance(read, NotFused) and read.kind == CONV1D:
        entry.notes.append("Conv1D base (fan_in_fan_out): weight passed as a transposed view")
    if not isinstance(read, NotFused) and read.kind == BNB_4BIT:
        w = read.weight
        entry.notes.append(
            f"bitsandbytes 4-bit base ({w.quant_type.upper()}, blocksize {w.blocksize}"
            f"{', nested absmax' if w.nested else ''}): fused, its tiles dequantized in the "
            "kernels; mixed batches (adapter_names) run PEFT's loop")
    if sharded:
        entry.notes.append(_SHARDED)
    if not writes_visible(layer, layer.base_layer):
        entry.notes.append("managed by FSDP: nothing cached (DoRA norms, mixed-batch adapters "
                           "are recomputed every call)")
    for a in entry.adapters:
        if a not in considered:
            other = read_adapter(layer, a)
            if isinstance(other, NotFused) and not other.sharded:
                entry.notes.append(f"{other.reason}: PEFT's forward runs while it is active")
    if any(is_dora(layer, a) for a in entry.adapters):
        entry.notes.append("DoRA (row norm cached; PEFT's forward while another adapter is "
                           "active with it and dropout is active)")
    if layer.merged:
        entry.notes.append("merged: PEFT's forward runs until unmerged")
    if layer.disable_adapters:
        entry.notes.append("adapters disabled: PEFT's forward runs until enabled")
    if not getattr(layer, "cast_input_dtype_enabled", True):
        entry.notes.append("input dtype casting disabled")
    return entry


def _selection(adapters) -> set[str] | None:
    if adapters is None:
        return None
    if isinstance(adapters, str):
        return {adapters}
    selected = set(adapters)
    if not selected or not all(isinstance(a, str) for a in selected):
        raise ValueError(f"adapters must be a name or a non-empty list of names, got {adapters!r}")
    return selected


def patch(model: nn.Module, *, adapters: str | Iterable[str] | None = None,
          verbose: bool = False) -> PatchReport:
    """Accelerate every supported PEFT LoRA ``Linear`` of ``model`` in place.

    ``model``: a ``PeftModel``, any model holding PEFT LoRA layers (e.g. transformers' or
    diffusers' ``add_adapter``) or a single LoRA layer. ``adapters``: the adapter names that
    must be accelerable for a layer to be patched (default: all adapters of the layer); a
    patched layer still runs PEFT's forward whenever an active adapter cannot take the fast
    path. Calling ``patch`` again is safe (new layers, e.g. after ``add_adapter`` on new
    target modules, get patched; layers that are no longer supported are restored).
    All or nothing: if anything raises, the model is left as it was.

    Returns a ``PatchReport`` (``print`` it for a table); ``verbose=True`` logs the table
    at INFO on the ``fastlora.peft`` logger. Layers left to PEFT are always summarized
    in a warning. Raises ``ValueError`` when the model holds no LoRA layer.
    """
    lora_layer, BaseTunerLayer = peft_lora()
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlora.patch expects an nn.Module, got {type(model).__name__}")
    selected = _selection(adapters)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not any(isinstance(m, lora_layer.LoraLayer) for _, m in layers):
        others = sorted({type(m).__name__ for _, m in layers})
        extra = f" (it holds other tuner layers: {', '.join(others)})" if others else ""
        raise ValueError(f"fastlora.patch: {type(model).__name__} holds no PEFT LoRA layer{extra}; "
                         "wrap it with peft.get_peft_model(model, LoraConfig(...)) first")
    if selected is not None:
        present = {a for _, m in layers for a in adapter_names(m)}
        missing = selected - present
        if missing:
            raise ValueError(f"fastlora.patch: unknown adapter(s) {sorted(missing)}; "
                             f"the model has {sorted(present)}")
    report = PatchReport([_judge(name, layer, selected) for name, layer in layers])
    to_swap, to_restore = [], []
    for (_, layer), entry in zip(layers, report):
        if entry.patched and is_patched(layer):
            entry.notes.insert(0, "already patched")
        elif entry.patched:
            to_swap.append(layer)
        elif is_patched(layer):  # patched earlier, unsupported now
            to_restore.append(layer)
    if report.patched:  # the LoRA tuner: mixed batches in training too
        to_swap += [m for m in model.modules()
                    if isinstance(m, lora_tuner_class()) and not is_patched(m)]
    _apply(to_swap, to_restore)
    if verbose:
        logger.info("%s", report)
    if not report.all_patched:
        logger.warning("%s (see the returned PatchReport)", report.summary())
    return report


def _apply(to_swap: list[nn.Module], to_restore: list[nn.Module]) -> None:
    """Swap and restore classes, undoing every change if one of them raises."""
    done = []
    try:
        for module in to_restore:
            classes.restore(module)
            done.append((module, classes.swap))
        for module in to_swap:
            classes.swap(module)
            done.append((module, classes.restore))
    except BaseException:
        for module, undo in reversed(done):
            undo(module)
        raise


def unpatch(model: nn.Module) -> list[str]:
    """Restore PEFT's classes on every layer (and the tuner) ``patch`` changed and remove
    what it added to them; returns the names of the LoRA layers restored."""
    restored = []
    for name, module in model.named_modules():
        if is_patched(module):
            original = type(module)._fastlora_original_class
            classes.restore(module)
            if not isinstance(module, lora_tuner_class()):
                restored.append(name or original.__name__)
    return restored
