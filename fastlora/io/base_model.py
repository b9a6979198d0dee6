"""Matching adapter layers to a base model's modules, and checking their shapes.

A layer name resolves to the module of that exact path, else (for dotted names) to the path
without its first segment (``transformer.blocks.0.to_q`` -> ``blocks.0.to_q``); kohya names
resolve through their underscored form. A PEFT-wrapped model works too: its
``base_model.model.`` prefix is dropped and LoRA wrappers are seen through.
"""
from __future__ import annotations

from torch import nn

from .adapter import AdapterLayer
from .errors import AdapterFormatError, AdapterShapeError
from .keys import A, B
from .names import PEFT_PREFIX, is_kohya_name, kohya_candidates

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def bind_to_model(layers: dict[str, AdapterLayer], keys: dict[str, dict[str, str]], base_model: nn.Module,
                  label: str) -> dict[str, AdapterLayer]:
    """``layers`` re-keyed by the base model's module paths, each checked against its module.

    ``keys`` gives each layer's tensor keys by role, for error messages.
    """
    modules = {name.removeprefix(PEFT_PREFIX): m for name, m in base_model.named_modules() if name}
    underscored: dict[str, set[str]] = {}
    if any(is_kohya_name(name) for name in layers):
        for path in modules:
            underscored.setdefault(path.replace(".", "_"), set()).add(path)
    bound: dict[str, AdapterLayer] = {}
    for name, layer in layers.items():
        target = _resolve(name, modules, underscored, f"{label}: {keys[name][A]!r}")
        if target in bound:
            raise AdapterFormatError(f"{label}: layer {name!r} and another layer both target module {target!r}")
        _check_shapes(layer, modules[target], target, f"{label}: {keys[name][A]!r} / {keys[name][B]!r}")
        bound[target] = layer
    return bound


def _resolve(name: str, modules: dict[str, nn.Module], underscored: dict[str, set[str]], where: str) -> str:
    if is_kohya_name(name):
        found = set().union(*(underscored.get(c, set()) for c in kohya_candidates(name)))
    else:
        found = {path for path in (name, name.partition(".")[2]) if path in modules}
        found = {name} if name in found else found
    if len(found) > 1:
        raise AdapterFormatError(f"{where}: layer {name!r} matches several base-model modules: {sorted(found)}")
    if not found:
        raise AdapterFormatError(f"{where}: layer {name!r} matches no module of the base model")
    return found.pop()


def _features(module: nn.Module) -> tuple[int, tuple[int, ...]] | None:
    """``(N, A.shape[1:])`` a LoRA on ``module`` must have, or None for an unsupported module."""
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if isinstance(module, _CONVS):
        return module.out_channels, (module.in_channels, *module.kernel_size)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        return module.nf, (module.weight.shape[0],)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, (module.in_features,)
    return None


def _check_shapes(layer: AdapterLayer, module: nn.Module, path: str, where: str) -> None:
    features = _features(module)
    if features is None:
        raise AdapterFormatError(f"{where}: base-model module {path!r} is a {type(module).__name__}, "
                                 "not a Linear or Conv layer")
    out_features, in_shape = features
    if tuple(layer.A.shape[1:]) != in_shape or layer.B.shape[0] != out_features:
        raise AdapterShapeError(
            f"{where}: A {list(layer.A.shape)} and B {list(layer.B.shape)} do not fit {path!r} "
            f"({type(module).__name__}): expected A [r, {', '.join(map(str, in_shape))}] and B [{out_features}, r]")
