"""Matching adapter layers to a base model's modules, and checking their shapes.

A dotted layer name resolves to the module of that exact path, else to the path without its
first segment (``transformer.blocks.0.to_q`` -> ``blocks.0.to_q``); kohya names resolve
through their underscored form (:func:`~fastlora.io.names.kohya_candidates`). Either way the
CLIP ``text_model`` level may be present on one side only (transformers 5 removed it from
``CLIPTextModel``). A PEFT-wrapped model works too: its ``base_model.model.`` prefix is
dropped and LoRA wrappers are seen through. A model holding several components (an
``nn.ModuleDict`` of a pipeline's ``unet``, ``text_encoder``, ...) binds names to
``<component>.<path>``.
"""
from __future__ import annotations

import math

from torch import nn

from .errors import AdapterFormatError, AdapterShapeError
from .names import KOHYA_COMPONENTS, PEFT_PREFIX, is_kohya_name, kohya_candidates, split_component, without_text_model

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SGM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


class _ModuleIndex:
    """A model's module paths, looked up by dotted or underscored spelling."""

    def __init__(self, model: nn.Module, kohya: bool):
        self.modules = {name.removeprefix(PEFT_PREFIX): m for name, m in model.named_modules() if name}
        self.dotted: dict[str, set[str]] = {}
        self.underscored: dict[str, set[str]] = {}
        for path in self.modules:
            short = without_text_model(path)
            for key in {path, short}:
                self.dotted.setdefault(key, set()).add(path)
                if kohya:
                    self.underscored.setdefault(key.replace(".", "_"), set()).add(path)

    def resolve(self, name: str, where: str) -> str:
        if is_kohya_name(name):
            found = set().union(*(self.underscored.get(c, set()) for c in kohya_candidates(name)))
        elif name in self.modules:
            return name
        else:
            tails = {name, name.partition(".")[2]}
            found = set().union(*(self.dotted.get(without_text_model(t), set()) for t in tails if t))
        if len(found) > 1:
            raise AdapterFormatError(f"{where}: layer {name!r} matches several base-model modules: {sorted(found)}")
        if not found:
            raise AdapterFormatError(f"{where}: layer {name!r} matches no module of the base model{_hint(name)}")
        return found.pop()


def _hint(name: str) -> str:
    if name.startswith(_SGM_UNET):
        return (" (kohya's SDXL names follow the original UNet's block layout, which is not mapped to diffusers' "
                "module names)")
    component = next((c for prefix, c in KOHYA_COMPONENTS if name.startswith(prefix)), split_component(name)[0])
    if component:
        return (f" (it belongs to a pipeline's {component!r}: to bind a file covering several components, pass "
                "an nn.ModuleDict of them, e.g. {'unet': unet, 'text_encoder': text_encoder})")
    return ""


def bind_to_model(layers: dict, keys: dict[str, str], base_model: nn.Module, label: str) -> dict:
    """``layers`` re-keyed by the base model's module paths, each checked against its module.

    ``keys`` gives each layer's tensor keys (one string), for error messages.
    """
    index = _ModuleIndex(base_model, any(is_kohya_name(name) for name in layers))
    bound = {}
    for name, layer in layers.items():
        where = f"{label}: {keys[name]}"
        target = index.resolve(name, where)
        if target in bound:
            raise AdapterFormatError(f"{label}: layer {name!r} and another layer both target module {target!r}")
        bound[target] = _checked(layer, index.modules[target], target, where)
    return bound


def _features(module: nn.Module) -> tuple[int, tuple[int, ...]] | None:
    """``(N, in_shape)`` of the weight ``[N, *in_shape]`` an adapter on ``module`` changes,
    or None for an unsupported module."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if isinstance(module, _CONVS):
        return module.out_channels, (module.in_channels // module.groups, *module.kernel_size)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        return module.nf, (module.weight.shape[0],)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, (module.in_features,)
    return None


def _checked(layer, module: nn.Module, path: str, where: str):
    """``layer``, its flattened kernel restored when it is a LyCORIS layer on a convolution."""
    features = _features(module)
    if features is None:
        raise AdapterFormatError(f"{where}: base-model module {path!r} is a {type(module).__name__}, "
                                 "not a Linear or Conv layer")
    out_features, in_shape = features
    if layer.kind != "lora" and layer.in_shape != in_shape and math.prod(layer.in_shape) == math.prod(in_shape):
        layer = layer.with_in_shape(in_shape)
    if layer.in_shape != in_shape or layer.out_features != out_features:
        raise AdapterShapeError(
            f"{where}: a [{layer.out_features}, {', '.join(map(str, layer.in_shape))}] change does not fit {path!r} "
            f"({type(module).__name__}, weight [{out_features}, {', '.join(map(str, in_shape))}])"
            if layer.kind != "lora" else
            f"{where}: A {list(layer.A.shape)} and B {list(layer.B.shape)} do not fit {path!r} "
            f"({type(module).__name__}): expected A [r, {', '.join(map(str, in_shape))}] and B [{out_features}, r]")
    return layer
