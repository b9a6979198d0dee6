"""What a PEFT LoRA layer holds, read for the fused ops: its base weight and adapters, or
why fastlora cannot run them."""
from __future__ import annotations

import torch
from torch import nn

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
    if isinstance(layer, lora_layer.Linear):
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



def _peft_weight(layer):
    """The base weight as ``[N, K]`` (a Conv1D's transposed view), or None if unsupported."""
    base = layer.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks:
        return None, base
    if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
        return base.weight, base
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None, base
    if isinstance(base, Conv1D):
        return base.weight.t(), base
    return None, base


def _peft_adapter(layer, name: str):
    """(lora_A, lora_B, scale, magnitude or None, dropout p), or None if the kernels cannot
    reproduce PEFT for this adapter (a LoRA variant other than DoRA, lora_bias, a dropout
    module other than nn.Dropout / nn.Identity)."""
    variant = layer.lora_variant.get(name) if hasattr(layer, "lora_variant") else None
    dora = name in getattr(layer, "lora_magnitude_vector", {})
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
        return None
    if layer.lora_B[name].bias is not None:
        return None
    drop = layer.lora_dropout[name]
    if type(drop) is nn.Dropout:
        p = drop.p if drop.training else 0.0
    elif type(drop) is nn.Identity:
        p = 0.0
    else:
        return None
    magnitude = layer.lora_magnitude_vector[name].weight if dora else None
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], magnitude, p

