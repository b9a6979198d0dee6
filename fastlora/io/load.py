"""``load_adapter``: read any supported LoRA file into an :class:`Adapter`, checking it fully.

Formats (``Adapter.source_format``), detected from the files and keys:

* ``peft``: a directory with ``adapter_config.json`` (or its ``adapter_model.safetensors``),
  or a file whose keys all start with ``base_model.model.`` (then alpha = rank).
* ``diffusers``: ``lora_A`` / ``lora_B`` keys (or the older ``lora.down`` /
  ``lora_linear_layer.down``), the config in the ``lora_adapter_metadata`` header entry,
  alpha = rank without it.
* ``kohya``: ``lora_down`` / ``lora_up`` keys, a scalar ``.alpha`` per module, else
  ``ss_network_alpha``, else alpha = rank; DoRA as ``dora_scale``.
* ``light-lora``: kohya-style keys with a ``lora_mid`` core, folded on load
  (:mod:`fastlora.io.light_lora`).
"""
from __future__ import annotations

import math
import os

import torch

from .adapter import Adapter, AdapterLayer, alpha_for_scale
from .base_model import bind_to_model
from .errors import AdapterFormatError, AdapterShapeError, NonFiniteWeightError
from .files import PEFT_CONFIG, RawAdapter, read_raw
from .keys import ALPHA, BIAS, DOTTED_KEYS, KOHYA_KEYS, MAGNITUDE, MID, PEFT_KEYS, A, B, group_keys
from .light_lora import fold_core
from .metadata import (
    DIFFUSERS_METADATA_KEY,
    LoraSettings,
    diffusers_config,
    kohya_default_alpha,
    kohya_name_map,
    parse_settings,
    passthrough_config,
)
from .names import PEFT_PREFIX, kohya_name

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_adapter(source: str | os.PathLike | dict[str, torch.Tensor], *, base_model: torch.nn.Module | None = None,
                 allow_pickle: bool = False) -> Adapter:
    """Load a LoRA adapter from a PEFT directory, a ``.safetensors`` file, or a state dict.

    With ``base_model``, layer names are resolved against its modules (kohya names mapped to
    dotted paths; a leading component such as ``transformer.`` dropped when needed) and every
    shape is checked against the module's weight. Tensors come back on the CPU in the file's
    dtypes. Raises :class:`AdapterFormatError` (or a subclass) naming the file and key; no
    partial adapter is ever returned.
    """
    raw = read_raw(source, allow_pickle)
    modules, family = group_keys(raw.tensors, raw.label)
    source_format = _detect_format(raw, modules, family)
    settings, config, default_alpha = _settings(raw, source_format)
    names = _module_names(raw, modules, source_format)
    layers, keys = {}, {}
    for module, roles in modules.items():
        name = names[module]
        if name in layers:
            raise AdapterFormatError(f"{raw.label}: {module!r} and another module both name layer {name!r}")
        component, relative = _settings_key(name, settings)
        layers[name] = _build_layer(raw, name, roles, family, settings.get(component), relative,
                                    default_alpha)
        keys[name] = roles
    if base_model is not None:
        layers = bind_to_model(layers, keys, base_model, raw.label)
    return Adapter(layers, source_format, config, dict(raw.metadata))


def _detect_format(raw: RawAdapter, modules: dict[str, dict[str, str]], family: str) -> str:
    if raw.peft_config is not None:
        if family != PEFT_KEYS:
            raise AdapterFormatError(f"{raw.label}: a PEFT adapter must use lora_A / lora_B keys")
        return "peft"
    if family == KOHYA_KEYS:
        return "light-lora" if any(MID in roles for roles in modules.values()) else "kohya"
    if family == DOTTED_KEYS or DIFFUSERS_METADATA_KEY in raw.metadata:
        return "diffusers"
    return "peft" if all(key.startswith(PEFT_PREFIX) for key in raw.tensors) else "diffusers"


def _settings(raw: RawAdapter, source_format: str) -> tuple[dict[str, LoraSettings], dict, float | None]:
    """``(settings by component, passthrough config, kohya default alpha)``."""
    if raw.peft_config is not None:
        where = f"{raw.label}: {PEFT_CONFIG}"
        return {"": parse_settings(raw.peft_config, where)}, passthrough_config(raw.peft_config, where), None
    if source_format == "diffusers":
        settings, config = diffusers_config(raw.metadata, raw.label)
        return settings, config, None
    if source_format in ("kohya", "light-lora"):
        return {}, {}, kohya_default_alpha(raw.metadata)
    return {}, {}, None


def _module_names(raw: RawAdapter, modules, source_format: str) -> dict[str, str]:
    """File module name -> layer name: PEFT's ``base_model.model.`` prefix dropped; kohya
    names mapped back through ``fastlora_module_names`` when the file has it."""
    if source_format == "peft":
        return {m: m.removeprefix(PEFT_PREFIX) for m in modules}
    if source_format not in ("kohya", "light-lora"):
        return {m: m for m in modules}
    name_map = kohya_name_map(raw.metadata, raw.label)
    for kohya, dotted in name_map.items():
        if kohya not in modules or kohya_name(dotted) != kohya:
            raise AdapterFormatError(
                f"{raw.label}: header metadata 'fastlora_module_names' maps {kohya!r} to {dotted!r}, "
                "which does not match the file's modules")
    return {m: name_map.get(m, m) for m in modules}


def _settings_key(name: str, settings: dict[str, LoraSettings]) -> tuple[str, str]:
    """The settings component a layer falls under, and its name relative to that component."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in settings and rest else ("", name)


def _weight(raw: RawAdapter, key: str, layer: str) -> torch.Tensor:
    tensor = raw.tensors[key]
    if tensor.dtype not in WEIGHT_DTYPES:
        raise AdapterFormatError(f"{raw.label}: {key!r}: dtype {tensor.dtype} is not a float16/bfloat16/"
                                 "float32/float64 weight")
    if not torch.isfinite(tensor).all():
        raise NonFiniteWeightError(f"{raw.label}: {key!r} (layer {layer!r}) holds NaN or Inf")
    return tensor


def _alpha(raw: RawAdapter, key: str, layer: str) -> float:
    tensor = raw.tensors[key]
    if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        raise AdapterFormatError(f"{raw.label}: {key!r}: alpha must be one real number, "
                                 f"got {tensor.dtype} {list(tensor.shape)}")
    alpha = float(tensor.reshape(()).double())
    if not math.isfinite(alpha):
        raise NonFiniteWeightError(f"{raw.label}: {key!r} (layer {layer!r}) holds NaN or Inf")
    return alpha


def _build_layer(raw: RawAdapter, name: str, roles: dict[str, str], family: str,
                 settings: LoraSettings | None, relative: str, default_alpha: float | None) -> AdapterLayer:
    label = raw.label
    for role, word in ((A, "down (lora_A)"), (B, "up (lora_B)")):
        if role not in roles:
            raise AdapterFormatError(f"{label}: layer {name!r} has {sorted(roles.values())} but no {word} weight")
    a, b = _weight(raw, roles[A], name), _weight(raw, roles[B], name)
    if a.dim() < 2:
        raise AdapterShapeError(f"{label}: {roles[A]!r}: shape {list(a.shape)} is not [r, K] or [r, C, *kernel]")
    alpha_rank = a.shape[0]
    if MID in roles:
        a = fold_core(a, _weight(raw, roles[MID], name), f"{label}: {roles[MID]!r}")
    if b.dim() > 2 and b.dim() == a.dim() and all(s == 1 for s in b.shape[2:]):
        b = b.reshape(b.shape[0], b.shape[1])
    if b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise AdapterShapeError(
            f"{label}: {roles[A]!r} {list(a.shape)} and {roles[B]!r} {list(b.shape)}: ranks disagree "
            "(expected A [r, ...] and B [N, r] or [N, r, 1, ...])")
    rank, out_features = a.shape[0], b.shape[0]
    expected = settings.rank_for(relative) if settings else None
    if expected is not None and expected != rank:
        raise AdapterShapeError(f"{label}: {roles[A]!r} has rank {rank} but the config gives r={expected}")
    if ALPHA in roles:
        alpha = _alpha(raw, roles[ALPHA], name)
    else:
        configured = settings.alpha_for(relative) if settings else None
        alpha = next(v for v in (configured, default_alpha, float(alpha_rank)) if v is not None)
    rslora = bool(settings and settings.use_rslora)
    if MID in roles:
        alpha = alpha_for_scale(alpha / alpha_rank, rank, rslora)
    magnitude = _magnitude(raw, roles, family, name, out_features, a.dim()) if MAGNITUDE in roles else None
    bias = _weight(raw, roles[BIAS], name) if BIAS in roles else None
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise AdapterShapeError(f"{label}: {roles[BIAS]!r}: shape {list(bias.shape)}, expected [{out_features}]")
    return AdapterLayer(a, b, alpha, rslora, magnitude, bias)


def _magnitude(raw: RawAdapter, roles, family: str, name: str, out_features: int, a_dims: int) -> torch.Tensor:
    """DoRA magnitude as ``[N]``: PEFT stores ``[N]`` (conv ``[1, N, 1, ...]``), kohya
    ``dora_scale`` ``[N, 1, ...]``; kohya's input-side ``[1, K]`` form is refused."""
    key = roles[MAGNITUDE]
    tensor = _weight(raw, key, name)
    ones = [1] * (a_dims - 2)
    allowed = [[out_features, 1, *ones]] if family == KOHYA_KEYS else [[out_features], [1, out_features, *ones]]
    if list(tensor.shape) not in allowed:
        raise AdapterShapeError(f"{raw.label}: {key!r}: shape {list(tensor.shape)}, expected one of {allowed} "
                                "(a per-output-channel DoRA magnitude)")
    return tensor.reshape(out_features)
