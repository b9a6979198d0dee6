"""What a PEFT LoRA ``Linear`` holds, read for the fused ops: its base weight and its
adapters, or why fastlora cannot run them.

The one place that knows PEFT's layer layout. ``patch`` asks it once per layer, the patched
forward on every call (through ``read_active``, which keeps the decision) and the
mixed-batch forward for every adapter of a batch, so the three always agree. Readers only
look at attributes, types and flags (no tensor data), so ``torch.compile`` traces them
without a graph break.
"""
from __future__ import annotations

import functools
from collections.abc import MutableMapping
from typing import NamedTuple

import torch
from torch import nn

from ..ops.cache import Stamped
from ..nn.layers import BNB_4BIT, CONV1D, LINEAR, linear_kind, loaded_class, quant_hint
from ..ops.quant4 import Quant4Weight, UnreadableLayout
from ..nn.swap import original_class

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def peft_lora():
    """PEFT's LoRA layer module and ``BaseTunerLayer`` (imported on first use)."""
    try:
        import peft.tuners.lora.layer as lora_layer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:  # pragma: no cover - peft is an optional dependency
        raise ImportError("fastlora.patch needs PEFT: pip install 'fastlora[peft]'") from e
    return lora_layer, BaseTunerLayer


def lora_tuner_class() -> type:
    """PEFT's LoRA tuner class (``LoraModel``)."""
    from peft.tuners.lora.model import LoraModel

    return LoraModel


@functools.cache
def _sharded_types() -> tuple[type, ...]:
    types = []
    try:
        from torch.distributed.tensor import DTensor
        types.append(DTensor)
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    return tuple(types)


@functools.cache
def _flat_param_type() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover
        return ()
    return (FlatParameter,)


class NotFused(NamedTuple):
    """Why PEFT's forward must run. ``sharded``: only because a parameter is a DTensor, which
    FSDP2 replaces by a plain tensor inside its forward (so a layer is patched anyway)."""
    reason: str
    sharded: bool = False


class Base(NamedTuple):
    """The base layer as the fused ops take it: weight ``[N, K]`` (a transformers
    ``Conv1D``'s ``[K, N]`` weight as its transposed view, no copy; a bitsandbytes
    ``Linear4bit``'s as a ``Quant4Weight`` view of its packed data, with the layer's compute
    dtype), bias ``[N]`` or None."""
    module: nn.Module
    weight: torch.Tensor | Quant4Weight
    bias: torch.Tensor | None
    kind: str


class Adapter(NamedTuple):
    """One adapter of a layer: lora_A ``[r, K]``, lora_B ``[N, r]``, its scale, its dropout
    module (``nn.Dropout`` or ``nn.Identity``), DoRA magnitude ``[N]`` or None, lora_B's
    bias ``[N]`` (``lora_bias=True``) or None. A and B share a float dtype."""
    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: nn.Module
    magnitude: torch.Tensor | None
    lora_bias: torch.Tensor | None

    def dropout_p(self) -> float:
        """The dropout probability PEFT's ``nn.Dropout`` applies now (0 in eval)."""
        drop = self.dropout
        return drop.p if type(drop) is nn.Dropout and drop.training else 0.0


# ------------------------------------------------------------------ parameters and modules

def _param_problem(what: str, p) -> NotFused | None:
    """Why a parameter cannot go to the fused ops as is (sharded, partitioned, quantized)."""
    if p is None:
        return None
    if isinstance(p, _sharded_types()):
        return NotFused(f"{what} is a DTensor (FSDP2 / tensor-parallel sharded parameter)", True)
    if isinstance(p, _flat_param_type()):
        return NotFused(f"{what} is an FSDP FlatParameter (sharded)")
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return NotFused(f"{what} is a DeepSpeed ZeRO-3 partitioned parameter")
    if type(p) not in (nn.Parameter, torch.Tensor):
        hint = quant_hint(p)
        kind = f"quantized ({hint}) " if hint else ""
        return NotFused(f"{what} is a {kind}tensor subclass {type(p).__name__}")
    if not p.is_floating_point():
        return NotFused(f"{what} has dtype {p.dtype} (quantized?); floating point needed")
    return None


def _hooked(*modules: nn.Module) -> bool:
    """Hooks or a replaced forward on one of ``modules`` (accelerate's offload, DeepSpeed, a
    user's): PEFT calls the module, the fused ops would bypass them."""
    for module in modules:
        attrs = module.__dict__  # accelerate's _hf_hook and replaced forward live there
        if (module._forward_hooks or module._forward_pre_hooks or "forward" in attrs
                or "_hf_hook" in attrs):
            return True
    return False


def is_dora(layer, name: str) -> bool:
    """Whether adapter ``name`` is a DoRA adapter (PEFT >= 0.16: a ``lora_variant`` entry;
    older PEFT: the ``use_dora`` flag)."""
    variants = getattr(layer, "lora_variant", {})
    if name in variants:
        return type(variants[name]).__name__ == "DoraLinearVariant"
    return bool(getattr(layer, "use_dora", {}).get(name, False))


def _variant_name(variant) -> str:
    name = type(variant).__name__
    for suffix in ("LinearVariant", "Variant"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return {"Dora": "DoRA", "ALora": "aLoRA", "QALora": "QA-LoRA", "BdLora": "BD-LoRA",
            "Kasa": "KaSA", "Velora": "VeLoRA", "Monteclora": "MonteCLoRA", "MiCA": "MiCA",
            "Arrow": "Arrow"}.get(name, name)


# ------------------------------------------------------------------------------ readers

def layer_problem(layer) -> str | None:
    """Why a tuner layer's class cannot be patched (it is not PEFT's LoRA ``Linear``)."""
    lora_layer, _ = peft_lora()
    cls = type(layer)
    lora_4bit = loaded_class("peft.tuners.lora.bnb", "Linear4bit")
    if lora_4bit is not None and isinstance(layer, lora_4bit):
        orig = original_class(layer)
        if orig.forward is not lora_4bit.forward:
            return f"{orig.__qualname__} overrides PEFT's Linear4bit.forward"
        return None
    if cls.__name__ == "Linear8bitLt":
        return ("bitsandbytes 8-bit base (Linear8bitLt) is not accelerated: the fused kernels "
                "read 16/32-bit and bitsandbytes 4-bit (NF4/FP4) weights")
    if not isinstance(layer, lora_layer.LoraLayer):
        tuner = cls.__module__.split(".")[2] if cls.__module__.startswith("peft.tuners.") else cls.__module__
        return f"not a LoRA layer ({tuner} tuner)"
    if isinstance(layer, lora_layer.Linear):
        orig = original_class(layer)
        if orig.forward is not lora_layer.Linear.forward:
            return f"{orig.__qualname__} overrides PEFT's Linear.forward"
        return None
    name = cls.__name__
    hint = quant_hint(layer)
    if hint:
        return f"quantized base ({hint}: {name})"
    if "adalora" in cls.__module__:
        return f"AdaLoRA layer ({name})"
    if isinstance(layer, getattr(lora_layer, "Embedding", ())):
        return "LoRA on an embedding (Embedding) is not accelerated"
    conv = tuple(c for c in (getattr(lora_layer, n, None) for n in ("Conv1d", "Conv2d", "Conv3d", "_ConvNd"))
                 if c is not None)
    if conv and isinstance(layer, conv):
        return f"convolution LoRA layer ({name}) is not accelerated"
    if name == "ParamWrapper":
        return "LoRA on a raw nn.Parameter (ParamWrapper) is not accelerated"
    if "tp_layer" in cls.__module__:
        return f"tensor-parallel LoRA layer ({name})"
    return f"unsupported LoRA layer type {cls.__module__}.{name}"


def read_base(layer) -> Base | NotFused:
    """The base layer of a LoRA ``Linear`` for the fused ops, or why PEFT's forward must run."""
    base = layer.base_layer
    _, BaseTunerLayer = peft_lora()
    if isinstance(base, BaseTunerLayer):
        return NotFused(f"base layer is another tuner layer ({type(base).__name__})")
    kind = linear_kind(base)
    if kind is None:
        hint = quant_hint(base)
        if hint:
            return NotFused(f"quantized base layer ({hint}: {type(base).__name__})")
        return NotFused(f"base layer {type(base).__name__} is not a plain nn.Linear or "
                        "transformers Conv1D")
    weight = base.weight
    if _hooked(base):
        return NotFused("base layer has forward hooks or a replaced forward "
                        "(accelerate offload / device map?)")
    bias = base.bias
    if kind == BNB_4BIT:
        return _bnb_4bit(base, weight, bias)
    if weight.dim() != 2:
        return NotFused(f"base weight has shape {tuple(weight.shape)}; 2-D needed")
    problem = _param_problem("base weight", weight) or _param_problem("base bias", bias)
    if problem is not None:
        return problem
    return Base(base, weight.t() if kind == CONV1D else weight, bias, kind)


def _bnb_4bit(base: nn.Module, weight, bias) -> Base | NotFused:
    """A bitsandbytes ``Linear4bit`` as a ``Quant4Weight`` view (its quant state as the
    module keeps it; compute dtype the layer's, None until bitsandbytes sets it from x),
    or why its layout cannot be read (not quantized yet, repacked for CPU inference, ...).
    A quant state that does not fit its packed data raises the check's error, as
    ``fastlora.lora_linear`` does: PEFT's forward would compute garbage from it."""
    state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    try:
        view = Quant4Weight.from_bnb(weight, state, compute_dtype=base.compute_dtype)
    except UnreadableLayout as e:
        return NotFused(f"bitsandbytes 4-bit weight not accelerated: {e}")
    if view.shape != (base.out_features, base.in_features):
        return NotFused(f"bitsandbytes 4-bit weight quantized as {list(view.shape)}, not "
                        f"[out_features, in_features] = [{base.out_features}, "
                        f"{base.in_features}] (bitsandbytes' deprecated orientation)")
    problem = _param_problem("base bias", bias)
    if problem is not None:
        return problem
    return Base(base, view, bias, BNB_4BIT)


def read_adapter(layer, name: str) -> Adapter | NotFused:
    """Adapter ``name`` of a LoRA ``Linear`` for the fused ops, or why PEFT's forward must
    run while it is active."""
    dora = is_dora(layer, name)
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and not dora:
        return NotFused(f"adapter '{name}' is a {_variant_name(variant)} adapter (LoRA variant)")
    parts = []
    for part in ("lora_A", "lora_B"):
        mod = getattr(layer, part)[name]
        if linear_kind(mod) != LINEAR:
            return NotFused(f"adapter '{name}': {part} is a {type(mod).__name__}, not nn.Linear")
        if _hooked(mod):
            return NotFused(f"adapter '{name}': {part} has forward hooks")
        problem = _param_problem(f"adapter '{name}' {part}.weight", mod.weight)
        if problem is not None:
            return problem
        if mod.weight.dtype not in FAST_DTYPES:
            return NotFused(f"adapter '{name}' has dtype {mod.weight.dtype}; the kernels take "
                            "fp16/bf16/fp32")
        parts.append(mod)
    lora_A, lora_B = parts
    if lora_A.weight.dtype != lora_B.weight.dtype:
        return NotFused(f"adapter '{name}': lora_A ({lora_A.weight.dtype}) and lora_B "
                        f"({lora_B.weight.dtype}) differ in dtype")
    lora_bias = lora_B.bias
    problem = _param_problem(f"adapter '{name}' lora_B.bias", lora_bias)
    if problem is not None:
        return problem
    magnitude = None
    if dora:
        if lora_bias is not None:
            return NotFused(f"adapter '{name}': DoRA with a lora_B bias")
        magnitude = layer.lora_magnitude_vector[name].weight
        problem = _param_problem(f"adapter '{name}' DoRA magnitude", magnitude)
        if problem is not None:
            return problem
    drop = layer.lora_dropout[name]
    if type(drop) not in (nn.Dropout, nn.Identity):
        return NotFused(f"adapter '{name}': dropout module {type(drop).__name__} is not "
                        "nn.Dropout/nn.Identity")
    if type(drop) is nn.Dropout and drop.p >= 1.0:
        return NotFused(f"adapter '{name}': dropout p={drop.p} (>= 1)")
    return Adapter(name, lora_A.weight, lora_B.weight, layer.scaling[name], drop, magnitude,
                   lora_bias)


def adapter_names(layer) -> tuple[str, ...]:
    """Every adapter a tuner layer holds (its LoRA and LoRA-embedding adapters)."""
    names = list(getattr(layer, "lora_A", {}).keys())
    names += [n for n in getattr(layer, "lora_embedding_A", {}).keys() if n not in names]
    return tuple(names)


# ----------------------------------------------------------------------- kept decisions

def read_active(layer, kept: MutableMapping | None) -> tuple[Base, list[Adapter]] | NotFused:
    """The base and the active adapters a LoRA ``Linear`` holds (in PEFT's order), as the
    fused forward takes them, or why PEFT's forward must run.

    ``kept``: the layer's kept decisions (its state; None keeps nothing). The readers above
    decide once; the decision is kept while everything it depends on is as it was: the
    active adapters, the modules' types and hooks, dropout ``p >= 1``, the adapters' LoRA
    variants, the presence of biases and magnitudes (``_look``), and the layout of every
    tensor read (``Stamped`` without versions: the reader reads no values). A steady-state
    call fetches the layer's current modules and parameters from their dicts and compares;
    the scales and dropout modules are always the current ones. A bitsandbytes 4-bit base is
    read on every call (its quant state is a plain object bitsandbytes replaces at will).
    """
    seen = _look(layer) if kept is not None and not torch.compiler.is_compiling() else None
    if seen is not None:
        names, extra, tensors, base, adapters = seen
        hit = kept.get(names)
        if hit is not None and hit.valid_for(tensors, extra):
            decided = hit.value
            if isinstance(decided, NotFused):
                return decided
            module, weight, bias = base
            return Base(module, weight.t() if decided == CONV1D else weight, bias,
                        decided), adapters
    read = read_base(layer)
    active = layer.active_adapters
    adapters = [read_adapter(layer, a) for a in active if a in layer.lora_A]
    decided = read if isinstance(read, NotFused) else next(
        (a for a in adapters if isinstance(a, NotFused)),
        NotFused("no active adapter") if not adapters else None)
    if decided is None:
        decided = (read, adapters)
    if seen is not None and (isinstance(decided, NotFused) or _agrees(read, adapters, seen)):
        kept[names] = Stamped(tensors, extra, decided if isinstance(decided, NotFused)
                              else read.kind, values=False)
    return decided


def _look(layer) -> tuple | None:
    """What ``read_active``'s decision depends on, fetched from the modules' own dicts (no
    reader check runs): (active adapter names the layer holds, the facts, the tensors, (base
    module, weight, bias), the adapters as ``Adapter``s with their current scales), or None
    for a layout the dicts do not show (a parameter that is not registered as one: a
    parametrization; modules missing) or a 4-bit base."""
    try:
        attrs, modules = layer.__dict__, layer._modules
        base = modules["base_layer"]
        params = base._parameters
        weight, bias = params["weight"], params.get("bias")
        if weight is None or (type(weight) is not nn.Parameter
                              and type(weight) is not torch.Tensor):
            return None  # 4-bit (Params4bit) and other tensor subclasses: read every call
        active = layer._active_adapter
        names = (active,) if type(active) is str else tuple(active)
        lora_A, lora_B = modules["lora_A"]._modules, modules["lora_B"]._modules
        dropouts = modules["lora_dropout"]._modules
        magnitudes = modules["lora_magnitude_vector"]._modules
        variants = attrs.get("lora_variant") or {}
        use_dora = attrs.get("use_dora") or {}
        scaling = attrs["scaling"]
        extra = [type(base), bias is None]
        hooked = [base]
        tensors = [weight] if bias is None else [weight, bias]
        held, adapters = [], []
        for name in names:
            mod_A = lora_A.get(name)
            if mod_A is None:
                continue
            mod_B, drop, mag = lora_B[name], dropouts[name], magnitudes.get(name)
            A, B = mod_A._parameters["weight"], mod_B._parameters["weight"]
            lora_bias = mod_B._parameters.get("bias")
            magnitude = mag._parameters["weight"] if mag is not None else None
            extra += (type(mod_A), type(mod_B), type(drop), drop.__dict__.get("p", 0.0) >= 1.0,
                      type(variants.get(name)), use_dora.get(name), lora_bias is None,
                      magnitude is None)
            hooked += (mod_A, mod_B)
            tensors += (A, B)
            if lora_bias is not None:
                tensors.append(lora_bias)
            if magnitude is not None:
                tensors.append(magnitude)
            held.append(name)
            adapters.append(Adapter(name, A, B, scaling[name], drop, magnitude, lora_bias))
        extra.append(_hooked(*hooked))
    except (KeyError, AttributeError, TypeError):
        return None
    return tuple(held), tuple(extra), tensors, (base, weight, bias), adapters


def _agrees(base: Base, adapters: list[Adapter], seen: tuple) -> bool:
    """Whether the readers read the very tensors and modules ``_look`` fetched."""
    _, _, _, (module, weight, bias), looked = seen
    w = base.weight._base if base.kind == CONV1D else base.weight
    return (base.module is module and w is weight and base.bias is bias
            and len(adapters) == len(looked)
            and all(a.A is b.A and a.B is b.B and a.dropout is b.dropout
                    and a.magnitude is b.magnitude and a.lora_bias is b.lora_bias
                    and a.name == b.name for a, b in zip(adapters, looked)))
