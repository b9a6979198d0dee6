"""``patch(model)`` / ``unpatch(model)``: accelerate an existing PEFT LoRA model in place.

Every supported ``peft.tuners.lora.layer.Linear`` gets its ``__class__`` swapped for a
subclass (created once per original class and cached) that overrides ``forward`` only.
Parameters, children, buffers and attributes stay where PEFT put them, so state_dict
keys, ``save_pretrained``, ``set_adapter``, ``add_adapter``, ``delete_adapter``,
merging, ``disable_adapter()``, ``rescale_adapter_scale``, deepcopy and pickling keep
working. The patched ``forward`` reads PEFT's parameters, ``scaling`` dict, dropout
modules and flags on every call (PEFT replaces them): nothing is cached.

The fast path (see ``_fast_forward``):

* first, or only, active adapter: fused with the base matmul by ``fastlora.lora_linear``
  (``x W^T + bias + s * drop(x) A^T B^T``; a transformers ``Conv1D`` base, weight
  ``[K, N]``, is passed as the transposed view ``W.t()``, no copy);
* several active adapters, same adapter dtype, no active dropout (inference,
  ``generate``, dropout-free training): one fused call on the adapters stacked along the
  rank, ``A = cat(A_i)`` and ``B = cat(s_i B_i)`` with scale 1. This is exactly
  ``sum_i s_i x A_i^T B_i^T`` and costs no extra pass over the ``M x N`` output;
* several active adapters with active dropout (PEFT draws an independent mask per
  adapter) or mixed adapter dtypes: the first adapter fused, each further one added in
  plain PyTorch exactly as PEFT does (same input cast chain, its own ``nn.Dropout``);
* one active DoRA adapter: ``fastlora.dora_linear``, its row norm cached on the layer
  while W, A, B and the scale are unchanged (so inference costs what LoRA costs);
* ``adapter_names`` mixed batches (a different adapter per sequence, ``"__base__"`` for
  none): ``fastlora.multi.peft_mixed_batch_forward``, one fused pass for all rows, DoRA
  adapters included (which PEFT refuses).

Anything the fast path cannot reproduce exactly goes to PEFT's own ``forward`` at call
time: merged or disabled adapters, extra forward
arguments, LoRA variants other than DoRA (aLoRA, ...), a DoRA adapter active together
with others, ``lora_bias``, forward hooks on the base
layer (accelerate offload, DeepSpeed), input/weight dtype mismatches outside autocast
(PEFT raises its own error there), dtypes the kernels lack. What can be known at patch
time is decided there: such layers are not patched and the ``PatchReport`` says why.
"""
from __future__ import annotations

import logging
from typing import Iterable

from torch import nn

from ..dora_cache import DoraNormCache
from .classes import _PATCHED_CLASSES, _patched_class, is_patched
from .reader import (_adapter_names, _adapter_problem, _base_problem, _is_conv1d, _is_dora,
                     _layer_type_problem, _lora_tuner_class, _peft_lora)
from .report import LayerReport, PatchReport

__all__ = ["is_patched", "patch", "unpatch"]

logger = logging.getLogger("fastlora.peft")


def _judge(name: str, layer, selected: set[str] | None, lora_layer, BaseTunerLayer) -> LayerReport:
    base = getattr(layer, "base_layer", None)
    entry = LayerReport(
        name=name or type(layer).__name__,
        layer_type=getattr(type(layer), "_fastlora_original_class", type(layer)).__name__,
        base_type=type(base).__name__ if base is not None else "-",
        adapters=_adapter_names(layer), patched=False)
    problem = _layer_type_problem(layer, lora_layer)
    if problem is None:
        problem = _base_problem(base, BaseTunerLayer)
    if problem is None:
        considered = [a for a in entry.adapters if selected is None or a in selected]
        if not considered:
            problem = f"holds none of the selected adapters ({', '.join(sorted(selected))})"
        for a in considered:
            problem = problem or _adapter_problem(layer, a)
    if problem is not None:
        entry.reason = problem
        return entry
    entry.patched = True
    if _is_conv1d(base):
        entry.notes.append("Conv1D base (fan_in_fan_out): weight passed as a transposed view")
    for a in entry.adapters:
        if selected is not None and a not in selected:
            other = _adapter_problem(layer, a)
            if other:
                entry.notes.append(f"{other}: PEFT's forward runs while it is active")
    if layer.merged:
        entry.notes.append("merged: PEFT's forward runs until unmerged")
    if layer.disable_adapters:
        entry.notes.append("adapters disabled: PEFT's forward runs until enabled")
    if not getattr(layer, "cast_input_dtype_enabled", True):
        entry.notes.append("input dtype casting disabled")
    return entry


def _tuner_layers(model: nn.Module, BaseTunerLayer) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def patch(model: nn.Module, *, adapters: str | Iterable[str] | None = None,
          verbose: bool = False) -> PatchReport:
    """Accelerate every supported PEFT LoRA ``Linear`` of ``model`` in place.

    ``model``: a ``PeftModel``, any model holding PEFT LoRA layers (e.g. transformers
    ``add_adapter``) or a single LoRA layer. ``adapters``: the adapter names that must be
    accelerable for a layer to be patched (default: all adapters of the layer); a patched
    layer still runs PEFT's forward whenever an active adapter cannot take the fast path.
    Calling ``patch`` again is safe (new layers, e.g. after ``add_adapter`` on new target
    modules, get patched; layers that are no longer supported are restored).

    Returns a ``PatchReport`` (``print`` it for a table); ``verbose=True`` logs the table
    at INFO on the ``fastlora.peft`` logger. Layers left to PEFT are always summarized
    in a warning. Raises ``ValueError`` when the model holds no LoRA layer.
    """
    lora_layer, BaseTunerLayer = _peft_lora()
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlora.patch expects an nn.Module, got {type(model).__name__}")
    if isinstance(adapters, str):
        selected: set[str] | None = {adapters}
    elif adapters is None:
        selected = None
    else:
        selected = set(adapters)
        if not selected or not all(isinstance(a, str) for a in selected):
            raise ValueError(f"adapters must be a name or a non-empty list of names, got {adapters!r}")
    layers = _tuner_layers(model, BaseTunerLayer)
    if not any(isinstance(m, lora_layer.LoraLayer) for _, m in layers):
        others = sorted({type(m).__name__ for _, m in layers})
        extra = f" (it holds other tuner layers: {', '.join(others)})" if others else ""
        raise ValueError(f"fastlora.patch: {type(model).__name__} holds no PEFT LoRA layer{extra}; "
                         "wrap it with peft.get_peft_model(model, LoraConfig(...)) first")
    if selected is not None:
        present = {a for _, m in layers for a in _adapter_names(m)}
        missing = selected - present
        if missing:
            raise ValueError(f"fastlora.patch: unknown adapter(s) {sorted(missing)}; "
                             f"the model has {sorted(present)}")
    entries = []
    for name, layer in layers:
        entry = _judge(name, layer, selected, lora_layer, BaseTunerLayer)
        cls = type(layer)
        if entry.patched:
            if cls in _PATCHED_CLASSES.values():
                entry.notes.insert(0, "already patched")
            else:
                layer.__class__ = _patched_class(cls)
                layer._fastlora_dora_norms = DoraNormCache()
            if any(_is_dora(layer, a) for a in entry.adapters):
                entry.notes.append("DoRA (row norm cached; PEFT's forward while another "
                                   "adapter is active with it)")
        elif cls in _PATCHED_CLASSES.values():  # patched earlier, unsupported now: restore
            _restore(layer)
        entries.append(entry)
    report = PatchReport(entries)
    if report.patched:
        for module in model.modules():  # the LoRA tuner: mixed batches in training too
            if (isinstance(module, _lora_tuner_class())
                    and type(module) not in _PATCHED_CLASSES.values()):
                module.__class__ = _patched_class(type(module))
    if verbose:
        logger.info("%s", report)
    if not report.all_patched:
        logger.warning("%s (see the returned PatchReport)", report.summary())
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Restore PEFT's classes on every layer (and the tuner) ``patch`` changed; returns the
    names of the LoRA layers restored."""
    restored = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _PATCHED_CLASSES.values():
            _restore(module)
            if not isinstance(module, _lora_tuner_class()):
                restored.append(name or cls._fastlora_original_class.__name__)
    return restored


def _restore(layer: nn.Module) -> None:
    layer.__class__ = type(layer)._fastlora_original_class
    layer.__dict__.pop("_fastlora_dora_norms", None)
