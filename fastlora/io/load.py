"""``load_adapter``: read any supported adapter file into an :class:`Adapter`, checking it fully.

Formats (``Adapter.source_format``), detected from the files and keys:

* ``peft``: a directory with ``adapter_config.json`` (or its ``adapter_model.safetensors``),
  or a file whose keys all start with ``base_model.model.`` (then alpha = rank). A config
  without ``lora_alpha`` means PEFT's ``LoraConfig`` default, 8.
* ``diffusers``: ``lora_A`` / ``lora_B`` keys (or the older ``lora.down`` /
  ``lora_linear_layer.down``), the config in the ``lora_adapter_metadata`` header entry
  (``lora_alpha`` absent: 8, as diffusers builds a ``LoraConfig`` from it); without that
  entry, alpha = rank.
* ``kohya``: ``lora_down`` / ``lora_up`` keys (LoCon: on convolutions too, with an optional
  Tucker core), a scalar ``.alpha`` per module; ``.alpha`` absent or 0 means alpha = rank for
  that module (no scaling, as kohya's own loader, ``resize_lora.py`` and LyCORIS read it;
  ``ss_network_alpha`` is a training default only); DoRA as ``dora_scale``. Module names:
  kohya's (``lora_unet_...``), or ``lycoris_<path>`` from LyCORIS' own wrapper.
* ``light-lora``: kohya-style keys with a 2-D ``lora_mid`` core, folded on load
  (:mod:`fastlora.io.cores`).
* ``lycoris``: kohya-style files with LoHa (``hada_*``) or LoKr (``lokr_*``) layers
  (:mod:`fastlora.io.lycoris`), possibly beside LoCon layers.

Tensors that are not adapter weights (an embedded textual inversion, ``ss_*`` tensors) are
left out with a :class:`SkippedTensorsWarning`, or refused with ``strict=True``.
"""
from __future__ import annotations

import os
import warnings

import torch

from .adapter import Adapter, AdapterLayer, alpha_for_scale
from .base_model import bind_to_model
from .cores import fold_core
from .errors import AdapterFormatError, AdapterShapeError, SkippedTensorsWarning
from .finite import check_finite, finite_number
from .files import PEFT_CONFIG, RawAdapter, read_raw
from .keys import ALPHA, BIAS, DOTTED_KEYS, KOHYA_KEYS, MAGNITUDE, MID, PEFT_KEYS, A, B, group_keys
from .lycoris import LOHA_ROLES, LOKR_ROLES, build_loha, build_lokr
from .metadata import (
    DIFFUSERS_METADATA_KEY,
    LoraSettings,
    diffusers_config,
    kohya_name_map,
    parse_settings,
    passthrough_config,
)
from .names import PEFT_PREFIX, kohya_name, split_component

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_adapter(source: str | os.PathLike | dict[str, torch.Tensor], *, base_model: torch.nn.Module | None = None,
                 allow_pickle: bool = False, strict: bool = False) -> Adapter:
    """Load an adapter from a PEFT directory, a ``.safetensors`` file, or a state dict.

    With ``base_model``, layer names are resolved against its modules (kohya names mapped to
    dotted paths; a leading component such as ``transformer.`` dropped when needed; CLIP's
    ``text_model`` level matched whether or not the model has it; an ``nn.ModuleDict`` of a
    pipeline's components binds ``unet.``, ``text_encoder.``, ... names) and every shape is
    checked against the module's weight. Tensors come back on the CPU in the file's dtypes.
    Raises ``FileNotFoundError`` for a missing path, else :class:`AdapterFormatError` (or a
    subclass) naming the file and key; no partial adapter is ever returned. Non-adapter tensors
    are skipped with a warning naming them, or refused when ``strict``.
    """
    raw = read_raw(source, allow_pickle)
    modules, family, skipped = group_keys(raw.tensors, raw.label)
    if skipped:
        _report_skipped(raw.label, skipped, strict)
    source_format = _detect_format(raw, modules, family)
    settings, config = _settings(raw, source_format)
    names = _module_names(raw, modules, source_format)
    layers, keys = {}, {}
    for module, roles in modules.items():
        name = names[module]
        if name in layers:
            raise AdapterFormatError(f"{raw.label}: {module!r} and another module both name layer {name!r}")
        component, relative = _settings_key(name, settings)
        layers[name] = _build_layer(raw, name, roles, family, settings.get(component), relative)
        keys[name] = " / ".join(repr(key) for key in roles.values())
    if base_model is not None:
        layers = bind_to_model(layers, keys, base_model, raw.label)
    return Adapter(layers, source_format, config, dict(raw.metadata), skipped,
                   pipeline=_is_pipeline(layers, settings, base_model))


def _is_pipeline(layers: dict, settings: dict[str, LoraSettings], base_model) -> bool:
    """Whether the evidence says the layer names are ``<component>.<path>`` over a diffusers
    pipeline: every name starts with a component and the names were bound to an
    ``nn.ModuleDict`` of components, or the file's config is given per component, or the
    names span several components. A name's first segment alone is no evidence."""
    components = {split_component(name)[0] for name in layers}
    if "" in components:
        return False
    if base_model is not None:
        return isinstance(base_model, torch.nn.ModuleDict)
    return len(components) > 1 or (bool(settings) and "" not in settings)


def _report_skipped(label: str, skipped: list[str], strict: bool) -> None:
    listed = ", ".join(repr(k) for k in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    if strict:
        raise AdapterFormatError(f"{label}: {len(skipped)} tensors are not adapter weights: {listed} "
                                 "(strict=False loads the adapter without them)")
    warnings.warn(f"{label}: skipped {len(skipped)} tensors that are not adapter weights: {listed}",
                  SkippedTensorsWarning, stacklevel=3)


def _detect_format(raw: RawAdapter, modules: dict[str, dict[str, str]], family: str) -> str:
    if raw.peft_config is not None:
        if family != PEFT_KEYS:
            raise AdapterFormatError(f"{raw.label}: a PEFT adapter must use lora_A / lora_B keys")
        return "peft"
    if family == KOHYA_KEYS:
        if any(role in LOHA_ROLES + LOKR_ROLES for roles in modules.values() for role in roles):
            return "lycoris"
        light = any(MID in roles and raw.tensors[roles[MID]].dim() == 2 for roles in modules.values())
        return "light-lora" if light else "kohya"
    if family == DOTTED_KEYS or DIFFUSERS_METADATA_KEY in raw.metadata:
        return "diffusers"
    return "peft" if all(key.startswith(PEFT_PREFIX) for key in raw.tensors) else "diffusers"


def _settings(raw: RawAdapter, source_format: str) -> tuple[dict[str, LoraSettings], dict]:
    """``(settings by component, passthrough config)``."""
    if raw.peft_config is not None:
        where = f"{raw.label}: {PEFT_CONFIG}"
        return {"": parse_settings(raw.peft_config, where)}, passthrough_config(raw.peft_config, where)
    if source_format == "diffusers":
        return diffusers_config(raw.metadata, raw.label)
    return {}, {}


def _module_names(raw: RawAdapter, modules, source_format: str) -> dict[str, str]:
    """File module name -> layer name: PEFT's ``base_model.model.`` prefix dropped; kohya
    names mapped back through ``fastlora_module_names`` when the file has it."""
    if source_format == "peft":
        return {m: m.removeprefix(PEFT_PREFIX) for m in modules}
    if source_format == "diffusers":
        return {m: m for m in modules}
    name_map = kohya_name_map(raw.metadata, raw.label)
    for kohya, dotted in name_map.items():
        if kohya not in modules or kohya not in (kohya_name(dotted), kohya_name(dotted, two_text_encoders=True)):
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
    check_finite(tensor, f"{raw.label}: {key!r} (layer {layer!r})")
    return tensor


def _alpha(raw: RawAdapter, key: str, layer: str) -> float:
    tensor = raw.tensors[key]
    if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
        raise AdapterFormatError(f"{raw.label}: {key!r}: alpha must be one real number, "
                                 f"got {tensor.dtype} {list(tensor.shape)}")
    return finite_number(float(tensor.reshape(()).double()), f"{raw.label}: {key!r} (layer {layer!r})")


def _build_layer(raw: RawAdapter, name: str, roles: dict[str, str], family: str,
                 settings: LoraSettings | None, relative: str):
    lycoris = [role for role in roles if role in LOHA_ROLES + LOKR_ROLES]
    if lycoris:
        return _build_lycoris(raw, name, roles, lycoris)
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
        if alpha == 0.0 and family == KOHYA_KEYS:
            alpha = float(alpha_rank)  # as kohya and LyCORIS: alpha 0 is no scaling
    else:
        configured = settings.alpha_for(relative) if settings else None
        alpha = float(alpha_rank) if configured is None else configured
    rslora = bool(settings and settings.use_rslora)
    if MID in roles:
        alpha = alpha_for_scale(alpha / alpha_rank, rank, rslora)
    magnitude = _magnitude(raw, roles, family, name, out_features, a.dim()) if MAGNITUDE in roles else None
    bias = _weight(raw, roles[BIAS], name) if BIAS in roles else None
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise AdapterShapeError(f"{label}: {roles[BIAS]!r}: shape {list(bias.shape)}, expected [{out_features}]")
    return AdapterLayer(a, b, alpha, rslora, magnitude, bias)


def _build_lycoris(raw: RawAdapter, name: str, roles: dict[str, str], lycoris: list[str]):
    """A LoHa or LoKr layer; its roles may not mix with LoRA ones or with each other."""
    others = [roles[r] for r in roles if r not in (*lycoris, ALPHA, MAGNITUDE)]
    kinds = {"loha" if role in LOHA_ROLES else "lokr" for role in lycoris}
    if others or len(kinds) > 1:
        raise AdapterFormatError(f"{raw.label}: layer {name!r} mixes adapter kinds: {sorted(roles.values())}")
    build = build_loha if kinds == {"loha"} else build_lokr
    tensors = {role: _weight(raw, roles[role], name) for role in lycoris}
    alpha = _alpha(raw, roles[ALPHA], name) if ALPHA in roles else None
    if alpha == 0.0:
        alpha = None  # as LyCORIS: alpha 0 is no scaling (alpha = r)
    layer = build(tensors, {role: roles[role] for role in lycoris}, alpha, None, f"{raw.label}: layer {name!r}")
    if MAGNITUDE in roles:
        layer.magnitude = _magnitude(raw, roles, KOHYA_KEYS, name, layer.out_features, len(layer.shape))
    return layer


def _magnitude(raw: RawAdapter, roles, family: str, name: str, out_features: int, weight_dims: int) -> torch.Tensor:
    """DoRA magnitude as ``[N]``: PEFT stores ``[N]`` (conv ``[1, N, 1, ...]``), kohya and
    LyCORIS ``dora_scale`` ``[N, 1, ...]``; the input-side ``[1, K, ...]`` form is refused."""
    key = roles[MAGNITUDE]
    tensor = _weight(raw, key, name)
    ones = [1] * (weight_dims - 2)
    if family == KOHYA_KEYS:
        ok = tensor.dim() >= 2 and tensor.shape[0] == out_features and all(s == 1 for s in tensor.shape[1:])
        allowed = f"[{out_features}, 1, ...]"
    else:
        ok = list(tensor.shape) in ([out_features], [1, out_features, *ones])
        allowed = f"[{out_features}] or {[1, out_features, *ones]}"
    if not ok:
        raise AdapterShapeError(f"{raw.label}: {key!r}: shape {list(tensor.shape)}, expected {allowed} "
                                "(a per-output-channel DoRA magnitude)")
    return tensor.reshape(out_features)
