"""Accelerate an existing PEFT LoRA model in place: ``patch(model)`` / ``unpatch(model)``.

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

import contextlib
import copyreg
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from .dora_cache import DoraNormCache
from .functional import dora_linear, lora_linear
from .multi import peft_mixed_batch_forward

__all__ = ["LayerReport", "PatchReport", "is_patched", "patch", "unpatch"]

logger = logging.getLogger(__name__)

_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LINEAR_FORWARD = nn.Linear.forward


def _peft_lora():
    try:
        import peft.tuners.lora.layer as lora_layer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:  # pragma: no cover - peft is an optional dependency
        raise ImportError("fastlora.patch needs PEFT: pip install 'fastlora[peft]'") from e
    return lora_layer, BaseTunerLayer


def _lora_tuner_class() -> type:
    """PEFT's LoRA tuner class (``LoraModel``)."""
    from peft.tuners.lora.model import LoraModel

    return LoraModel


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers not installed: no Conv1D bases to recognize
        return None
    return Conv1D


_CONV1D = _conv1d_class()
_CONV1D_FORWARD = _CONV1D.forward if _CONV1D is not None else None


# --------------------------------------------------------------------------------------
# the patched forward
# --------------------------------------------------------------------------------------

def _is_conv1d(base: nn.Module) -> bool:
    return _CONV1D is not None and isinstance(base, _CONV1D) and type(base).forward is _CONV1D_FORWARD


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``Linear.forward`` with the LoRA branch fused into the base matmul.

    Only attribute reads and type/flag checks decide between the fused path and PEFT's
    own forward (no data-dependent Python), so torch.compile traces it without a break.
    """
    peft_forward = type(self)._fastlora_original_class.forward
    if not args and kwargs.keys() == {"adapter_names"} and kwargs["adapter_names"] is not None:
        # a mixed batch: PEFT's model-level hook has already rejected unknown names
        names = kwargs["adapter_names"]
        return peft_mixed_batch_forward(self, x, names, known_adapters=names)
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)
    base = self.base_layer
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        # hooks (DeepSpeed, user) or a replaced forward (accelerate offload): PEFT calls
        # base_layer(x), the fused op would bypass them
        return peft_forward(self, x, *args, **kwargs)
    if isinstance(base, nn.Linear) and type(base).forward is _LINEAR_FORWARD:
        weight = base.weight
    elif _is_conv1d(base):
        weight = base.weight.t()  # Conv1D stores [K, N]: a transposed view, no copy
    else:
        return peft_forward(self, x, *args, **kwargs)
    bias = base.bias

    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and (x.dtype != weight.dtype or x.dtype not in _FAST_DTYPES):
        return peft_forward(self, x, *args, **kwargs)
    cast_input = getattr(self, "cast_input_dtype_enabled", True)

    names = [a for a in self.active_adapters if a in self.lora_A]
    if not names:
        return peft_forward(self, x, *args, **kwargs)
    adapter_dtype = self.lora_A[names[0]].weight.dtype
    variants = getattr(self, "lora_variant", {})  # PEFT < 0.16: DoRA flagged in use_dora only
    lora_bias = getattr(self, "lora_bias", {})
    same_dtype = True
    dropping = False
    dora = False
    for a in names:
        is_dora = _is_dora(self, a)
        if lora_bias.get(a, False) or (a in variants and not is_dora):
            return peft_forward(self, x, *args, **kwargs)
        dora = dora or is_dora
        drop = self.lora_dropout[a]
        if type(drop) is nn.Dropout:
            if drop.training and drop.p > 0.0:
                if drop.p >= 1.0:
                    return peft_forward(self, x, *args, **kwargs)
                dropping = True
        elif type(drop) is not nn.Identity:
            return peft_forward(self, x, *args, **kwargs)
        a_dtype = self.lora_A[a].weight.dtype
        if a_dtype not in _FAST_DTYPES or self.lora_B[a].weight.dtype != a_dtype:
            return peft_forward(self, x, *args, **kwargs)
        if a_dtype != adapter_dtype:
            same_dtype = False
        if not cast_input and not autocast and a_dtype != x.dtype:
            return peft_forward(self, x, *args, **kwargs)  # PEFT would not cast x: its error

    first = names[0]
    if dora:
        if len(names) > 1:  # the DoRA factor rescales the running sum of several adapters
            return peft_forward(self, x, *args, **kwargs)
        return _dora_forward(self, first, x, weight, bias)
    if len(names) == 1 or (same_dtype and not dropping):
        if len(names) == 1:
            lora_A = self.lora_A[first].weight
            lora_B = self.lora_B[first].weight
            scaling = self.scaling[first]
        else:  # stacked along the rank, each scale folded into its B
            lora_A = torch.cat([self.lora_A[a].weight for a in names], dim=0)
            lora_B = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in names], dim=1)
            scaling = 1.0
        drop = self.lora_dropout[first]
        p = drop.p if (type(drop) is nn.Dropout and drop.training) else 0.0
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=p, training=p > 0.0)

    # Dropout on several adapters (independent masks, as PEFT) or mixed adapter dtypes:
    # the first adapter fused, the others as PEFT computes them.
    drop = self.lora_dropout[first]
    p = drop.p if (type(drop) is nn.Dropout and drop.training) else 0.0
    result = lora_linear(x, weight, bias, self.lora_A[first].weight, self.lora_B[first].weight,
                         self.scaling[first], dropout_p=p, training=p > 0.0)
    result_dtype = result.dtype
    xl = x
    for a in names:  # the input cast chain of PEFT's loop, first adapter included
        lora_A = self.lora_A[a]
        if cast_input and xl.dtype != lora_A.weight.dtype:
            xl = xl.to(lora_A.weight.dtype)
        if a == first:
            continue
        result = result + self.lora_B[a](lora_A(self.lora_dropout[a](xl))) * self.scaling[a]
    return result.to(result_dtype)


def _dora_forward(self, a: str, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """One active DoRA adapter: ``fastlora.dora_linear`` with the row norm from the layer's
    cache (valid while W, A, B and the scale are unchanged)."""
    lora_A = self.lora_A[a].weight
    lora_B = self.lora_B[a].weight
    scaling = self.scaling[a]
    norms = self.__dict__.get("_fastlora_dora_norms")
    norm = norms.get(a, weight, lora_A, lora_B, scaling) if norms is not None else None
    drop = self.lora_dropout[a]
    p = drop.p if (type(drop) is nn.Dropout and drop.training) else 0.0
    return dora_linear(x, weight, bias, lora_A, lora_B, scaling,
                       self.lora_magnitude_vector[a].weight, dropout_p=p, training=p > 0.0,
                       weight_norm=norm)


def _reduce_ex(self, protocol):
    """Pickle/deepcopy a patched layer by its original class, not the generated one
    (which exists only once ``patch`` ran): ``_new_patched`` recreates it on load."""
    rv = object.__reduce_ex__(self, protocol)
    cls = type(self)
    if not (isinstance(rv, tuple) and len(rv) >= 2 and rv[1] and rv[1][0] is cls):
        return rv
    if rv[0] is copyreg.__newobj__:
        args = tuple(rv[1][1:])
    elif rv[0] is copyreg._reconstructor:  # protocols 0 and 1
        args = ()
    else:
        return rv
    return (_new_patched, (cls._fastlora_original_class, *args)) + tuple(rv[2:])


def _new_patched(original_class: type, *args):
    cls = _patched_class(original_class)
    return cls.__new__(cls, *args)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(original_class: type) -> type:
    """The cached subclass of a PEFT LoRA layer class (``forward`` fused) or of a LoRA
    tuner class (``_enable_peft_forward_hooks`` taking mixed batches in training too)."""
    cls = _PATCHED_CLASSES.get(original_class)
    if cls is None:
        name = f"FastLora{original_class.__name__}"
        tuner = hasattr(original_class, "_enable_peft_forward_hooks")
        override = ({"_enable_peft_forward_hooks": _tuner_forward_hooks} if tuner
                    else {"forward": _fast_forward})
        cls = type(name, (original_class,), {
            **override,
            "__reduce_ex__": _reduce_ex,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{original_class.__qualname__} with {next(iter(override))} from "
                       "fastlora (fastlora.patch); everything else is PEFT's.",
            "_fastlora_original_class": original_class,
        })
        _PATCHED_CLASSES[original_class] = cls
    return cls


def _tuner_forward_hooks(self, *args, **kwargs):
    """PEFT's context that routes ``adapter_names`` to the layers refuses them in training
    mode (PEFT's layers cannot train a mixed batch); the patched layers can, so in
    training PEFT's checks run with the tuner object (only it) flagged as in eval."""
    original = type(self)._fastlora_original_class._enable_peft_forward_hooks
    if kwargs.get("adapter_names") is None or not self.training:
        return original(self, *args, **kwargs)
    return _training_mixed_batch(self, original(self, *args, **kwargs))


@contextlib.contextmanager
def _training_mixed_batch(tuner: nn.Module, hooks):
    with contextlib.ExitStack() as stack:
        tuner.training = False
        try:
            stack.enter_context(hooks)
        finally:
            tuner.training = True
        yield


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` is a LoRA layer patched by ``fastlora.patch``."""
    return type(module) in _PATCHED_CLASSES.values()


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------

@dataclass
class LayerReport:
    """One LoRA (or other tuner) layer: patched or not, why, and notes on runtime fallbacks."""
    name: str
    layer_type: str
    base_type: str
    adapters: tuple[str, ...]
    patched: bool
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "patched" if self.patched else "NOT patched"


@dataclass
class PatchReport:
    """What ``fastlora.patch`` did to each tuner layer of a model; ``print`` it for a table."""
    layers: list[LayerReport]

    @property
    def patched(self) -> list[str]:
        """Names of the layers whose forward is now fastlora's."""
        return [e.name for e in self.layers if e.patched]

    @property
    def not_patched(self) -> dict[str, str]:
        """Layer name -> why it was left to PEFT."""
        return {e.name: e.reason for e in self.layers if not e.patched}

    @property
    def all_patched(self) -> bool:
        return all(e.patched for e in self.layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for e in self.layers:
            if e.name == name:
                return e
        raise KeyError(name)

    def summary(self) -> str:
        n, k = len(self.layers), len(self.patched)
        line = f"fastlora.patch: {k} of {n} LoRA layer{'s' if n != 1 else ''} patched"
        if k < n:
            reasons: dict[str, int] = {}
            for e in self.layers:
                if not e.patched:
                    reasons[e.reason] = reasons.get(e.reason, 0) + 1
            line += "; not patched: " + "; ".join(f"{c} x {r}" for r, c in reasons.items())
        return line

    def to_dict(self) -> dict:
        return {"patched": len(self.patched), "total": len(self.layers),
                "layers": [{"name": e.name, "layer_type": e.layer_type, "base_type": e.base_type,
                            "adapters": list(e.adapters), "patched": e.patched,
                            "reason": e.reason, "notes": list(e.notes)} for e in self.layers]}

    def __str__(self) -> str:
        header = ("layer", "type", "base", "adapters", "status", "reason / notes")
        rows = []
        for e in self.layers:
            why = e.reason if not e.patched else "; ".join(e.notes)
            rows.append((e.name, e.layer_type, e.base_type, ",".join(e.adapters), e.status, why))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(header[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [self.summary(), fmt.format(*header), fmt.format(*("-" * w for w in widths), "-" * 14)]
        lines += [fmt.format(*r).rstrip() for r in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<PatchReport {len(self.patched)}/{len(self.layers)} patched>"


# --------------------------------------------------------------------------------------
# what can be patched
# --------------------------------------------------------------------------------------

_QUANT_HINTS = {"bitsandbytes": "bitsandbytes", "bnb": "bitsandbytes", "gptq": "GPTQ", "awq": "AWQ",
                "aqlm": "AQLM", "hqq": "HQQ", "eetq": "EETQ", "torchao": "torchao",
                "optimum": "optimum", "quanto": "quanto", "auto_round": "auto-round",
                "transformer_engine": "Transformer Engine", ".inc": "Intel Neural Compressor",
                "fp8": "FP8"}


def _quant_hint(obj) -> str | None:
    mod = (type(obj).__module__ or "").lower() + "." + type(obj).__name__.lower()
    for key, label in _QUANT_HINTS.items():
        if key in mod:
            return label
    return None


def _param_problem(what: str, p) -> str | None:
    """Why a parameter cannot go to the fused op as is (sharded, partitioned, quantized)."""
    if p is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    if DTensor and isinstance(p, DTensor):
        return f"{what} is a DTensor (FSDP2 / tensor-parallel sharded parameter)"
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover
        FlatParameter = ()
    if FlatParameter and isinstance(p, FlatParameter):
        return f"{what} is an FSDP FlatParameter (sharded)"
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return f"{what} is a DeepSpeed ZeRO-3 partitioned parameter"
    if type(p) not in (nn.Parameter, torch.Tensor):
        hint = _quant_hint(p)
        kind = f"quantized ({hint}) " if hint else ""
        return f"{what} is a {kind}tensor subclass {type(p).__name__}"
    if not p.is_floating_point():
        return f"{what} has dtype {p.dtype} (quantized?); floating point needed"
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or hasattr(module, "_hf_hook"))


def _layer_type_problem(layer, lora_layer) -> str | None:
    cls = type(layer)
    if not isinstance(layer, lora_layer.LoraLayer):
        tuner = cls.__module__.split(".")[2] if cls.__module__.startswith("peft.tuners.") else cls.__module__
        return f"not a LoRA layer ({tuner} tuner)"
    if isinstance(layer, lora_layer.Linear) or cls in _PATCHED_CLASSES.values():
        orig = getattr(cls, "_fastlora_original_class", cls)
        if orig.forward is not lora_layer.Linear.forward:
            return f"{orig.__qualname__} overrides PEFT's Linear.forward"
        return None
    name = cls.__name__
    module = cls.__module__
    hint = _quant_hint(layer)
    if hint:
        return f"quantized base ({hint}: {name})"
    if "adalora" in module:
        return f"AdaLoRA layer ({name})"
    if isinstance(layer, getattr(lora_layer, "Embedding", ())):
        return "LoRA on an embedding (Embedding) is not accelerated"
    conv = tuple(c for c in (getattr(lora_layer, n, None) for n in ("Conv1d", "Conv2d", "Conv3d", "_ConvNd"))
                 if c is not None)
    if conv and isinstance(layer, conv):
        return f"convolution LoRA layer ({name}) is not accelerated"
    if name == "ParamWrapper":
        return "LoRA on a raw nn.Parameter (ParamWrapper) is not accelerated"
    if "tp_layer" in module:
        return f"tensor-parallel LoRA layer ({name})"
    return f"unsupported LoRA layer type {module}.{name}"


def _base_problem(base: nn.Module, BaseTunerLayer) -> str | None:
    if isinstance(base, BaseTunerLayer):
        return f"base layer is another tuner layer ({type(base).__name__})"
    plain_linear = isinstance(base, nn.Linear) and type(base).forward is _LINEAR_FORWARD
    if not (plain_linear or _is_conv1d(base)):
        hint = _quant_hint(base)
        if hint:
            return f"quantized base layer ({hint}: {type(base).__name__})"
        return f"base layer {type(base).__name__} is not a plain nn.Linear or transformers Conv1D"
    if _hooked(base):
        return "base layer has forward hooks or a replaced forward (accelerate offload / device map?)"
    for pname in ("weight", "bias"):
        problem = _param_problem(f"base {pname}", getattr(base, pname, None))
        if problem:
            return problem
    if base.weight.dim() != 2:
        return f"base weight has shape {tuple(base.weight.shape)}; 2-D needed"
    return None


def _variant_name(variant) -> str:
    name = type(variant).__name__
    for suffix in ("LinearVariant", "Variant"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return {"Dora": "DoRA", "ALora": "aLoRA", "QALora": "QA-LoRA", "BdLora": "BD-LoRA",
            "Kasa": "KaSA", "Velora": "VeLoRA", "Monteclora": "MonteCLoRA", "MiCA": "MiCA",
            "Arrow": "Arrow"}.get(name, name)


def _is_dora(layer, a: str) -> bool:
    """Whether adapter ``a`` is a DoRA Linear adapter (PEFT >= 0.16: a lora_variant entry;
    older PEFT: the use_dora flag)."""
    variants = getattr(layer, "lora_variant", {})
    if a in variants:
        return type(variants[a]).__name__ == "DoraLinearVariant"
    return bool(getattr(layer, "use_dora", {}).get(a, False))


def _adapter_problem(layer, a: str) -> str | None:
    variants = getattr(layer, "lora_variant", {})
    if a in variants and not _is_dora(layer, a):
        return f"adapter '{a}' is a {_variant_name(variants[a])} adapter (LoRA variant)"
    if _is_dora(layer, a):
        problem = _param_problem(f"adapter '{a}' DoRA magnitude",
                                 layer.lora_magnitude_vector[a].weight)
        if problem:
            return problem
    if getattr(layer, "lora_bias", {}).get(a, False):
        return f"adapter '{a}' has lora_bias=True (lora_B has a bias)"
    for part in ("lora_A", "lora_B"):
        mod = getattr(layer, part)[a]
        if not (isinstance(mod, nn.Linear) and type(mod).forward is _LINEAR_FORWARD):
            return f"adapter '{a}': {part} is a {type(mod).__name__}, not nn.Linear"
        if _hooked(mod):
            return f"adapter '{a}': {part} has forward hooks"
        problem = _param_problem(f"adapter '{a}' {part}.weight", mod.weight)
        if problem:
            return problem
        if mod.weight.dtype not in _FAST_DTYPES:
            return f"adapter '{a}' has dtype {mod.weight.dtype}; the kernels take fp16/bf16/fp32"
    drop = layer.lora_dropout[a]
    if type(drop) not in (nn.Dropout, nn.Identity):
        return f"adapter '{a}': dropout module {type(drop).__name__} is not nn.Dropout/nn.Identity"
    if type(drop) is nn.Dropout and drop.p >= 1.0:
        return f"adapter '{a}': dropout p={drop.p} (>= 1)"
    return None


def _adapter_names(layer) -> tuple[str, ...]:
    names = list(getattr(layer, "lora_A", {}).keys())
    for extra in ("lora_embedding_A",):
        names += [n for n in getattr(layer, extra, {}).keys() if n not in names]
    return tuple(names)


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
    at INFO on the ``fastlora.patching`` logger. Layers left to PEFT are always summarized
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
