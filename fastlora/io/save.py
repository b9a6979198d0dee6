"""``save_adapter``: write an :class:`Adapter` as a PEFT directory, a diffusers file or a kohya file.

Alpha is always written explicitly, so every format reloads with the same per-layer scales:

* ``peft``: ``adapter_config.json`` (``r`` / ``lora_alpha`` = the most common rank / alpha,
  ``rank_pattern`` / ``alpha_pattern`` for the other layers) plus ``adapter_model.safetensors``
  with keys ``base_model.model.<name>.lora_A.weight`` and the same config in its
  ``lora_adapter_metadata`` header entry. For a pipeline's adapter (``Adapter.pipeline``:
  names ``unet.``, ``text_encoder.``, ...), one such directory per component
  (``<path>/unet``, ...), names relative to it: PEFT loads an adapter onto one model.
* ``diffusers``: one ``.safetensors`` file with keys ``<name>.lora_A.weight``; the config in
  ``lora_adapter_metadata``, its keys prefixed per component (``transformer.r``) for a
  pipeline's adapter.
* ``kohya``: one ``.safetensors`` file with ``<kohya name>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (= scale * rank: kohya has no rsLoRA; a scale of 0 is refused, as kohya reads
  alpha 0 as alpha = rank) / ``.dora_scale``; ``ss_network_*`` header
  entries, and ``fastlora_module_names`` mapping kohya names back to dotted ones.

Only LoRA layers can be written (:func:`fastlora.io.to_lora` turns LoHa / LoKr into LoRA), and
PEFT and diffusers files need module paths, not kohya's underscored names (load with a base
model to bind them).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, AdapterLayer, alpha_for_scale
from .errors import AdapterFormatError
from .files import PEFT_CONFIG, PEFT_WEIGHTS, make_dirs, write_json, write_safetensors
from .finite import check_finite, finite_number
from .metadata import DIFFUSERS_METADATA_KEY, KOHYA_ALPHA_KEY, KOHYA_DIM_KEY, NAME_MAP_KEY, pattern_value
from .names import PEFT_PREFIX, is_kohya_name, kohya_name, split_component
from .summary import json_number

SAVE_FORMATS = ("peft", "diffusers", "kohya")


def save_adapter(adapter: Adapter, path: str | os.PathLike, format: str = "peft") -> list[Path]:
    """Write ``adapter`` to ``path``: a directory for ``peft``, a ``.safetensors`` file otherwise.
    Returns the adapters written: ``[path]``, or one PEFT directory per diffusers component."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    if not adapter.layers:
        raise AdapterFormatError(f"{path}: the adapter has no layers")
    _check_writable(adapter, path, format)
    path = Path(path)
    if format == "peft":
        groups = _by_component(adapter)
        for component, layers in groups.items():
            _write_peft(layers, adapter.config, path / component)
        return [path / component for component in groups]
    if path.is_dir():
        raise AdapterFormatError(f"{path}: is a directory; the {format} format is a single .safetensors file")
    make_dirs(path.parent, path)
    if format == "diffusers":
        write_safetensors(_peft_tensors(adapter.layers, ""), path, _header(_diffusers_config(adapter)))
    else:
        tensors, metadata = _kohya_contents(adapter.layers, path)
        write_safetensors(tensors, path, metadata)
    return [path]


def _write_peft(layers: dict[str, AdapterLayer], passthrough: dict[str, Any], path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise AdapterFormatError(f"{path}: is a file; the peft format is a directory")
    make_dirs(path)
    config = {**_lora_config(layers), **passthrough}
    write_safetensors(_peft_tensors(layers, PEFT_PREFIX), path / PEFT_WEIGHTS, _header(config))
    write_json(config, path / PEFT_CONFIG)


def _check_writable(adapter: Adapter, path, format: str) -> None:
    for name, layer in adapter.layers.items():
        if layer.kind != "lora":
            raise AdapterFormatError(
                f"{path}: layer {name!r} is a {layer.kind} layer, and {format} files hold LoRA factors: turn it "
                "into LoRA first (fastlora.io.to_lora(adapter, rank=R); command line: --rank R)")
        finite_number(layer.alpha, f"{path}: layer {name!r}: alpha")
        for what in ("A", "B", "magnitude", "bias"):
            tensor = getattr(layer, what)
            if tensor is not None:
                check_finite(tensor, f"{path}: layer {name!r}: {what}")
    unbound = [name for name in adapter.layers if is_kohya_name(name)]
    if unbound and format != "kohya":
        also = "; diffusers also loads kohya files as they are" if format == "diffusers" else ""
        raise AdapterFormatError(
            f"{path}: layer names such as {unbound[0]!r} are kohya's underscored names, which do not say where "
            f"a module path has dots; {format} files need module paths: load the adapter with base_model= "
            f"(command line: --base-model DIR, a local transformers or diffusers model) to bind them{also}")
    if format != "kohya":
        _check_dora_everywhere(adapter, path)


def _check_dora_everywhere(adapter: Adapter, path) -> None:
    missing = [n for n, layer in adapter.layers.items() if layer.magnitude is None]
    if adapter.use_dora and missing:
        raise AdapterFormatError(f"{path}: PEFT's use_dora covers every layer, but {missing[0]!r} "
                                 "has no DoRA magnitude")


def _header(config: dict[str, Any]) -> dict[str, str]:
    return {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(config)}


def _up_weight(layer: AdapterLayer) -> torch.Tensor:
    """B as the file stores it: ``[N, r]``, or ``[N, r, 1, ...]`` for a convolution."""
    return layer.B.reshape(*layer.B.shape, *[1] * (layer.A.dim() - 2))


def _peft_tensors(layers: dict[str, AdapterLayer], prefix: str) -> dict[str, torch.Tensor]:
    """PEFT keys; a missing ``lora_B.bias`` is written as zeros when another layer has one."""
    any_bias = any(layer.bias is not None for layer in layers.values())
    tensors = {}
    for name, layer in layers.items():
        key = f"{prefix}{name}"
        tensors[f"{key}.lora_A.weight"] = layer.A
        tensors[f"{key}.lora_B.weight"] = _up_weight(layer)
        if any_bias:
            tensors[f"{key}.lora_B.bias"] = layer.bias if layer.bias is not None \
                else layer.B.new_zeros(layer.B.shape[0])
        if layer.magnitude is not None:
            shape = [1, -1, *[1] * (layer.A.dim() - 2)] if layer.is_conv else [-1]
            tensors[f"{key}.lora_magnitude_vector"] = layer.magnitude.reshape(shape)
    return tensors


def _most_common(values) -> Any:
    return Counter(values).most_common(1)[0][0]


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """The shortest PEFT pattern dict giving each name its value: names whose value differs from
    ``default``, longest first (PEFT takes the first match); every name when a shorter name's
    pattern would also catch a longer one."""
    ordered = sorted(values.items(), key=lambda item: -len(item[0]))
    for pattern in ({n: v for n, v in ordered if v != default}, dict(ordered)):
        if all(pattern_value(pattern, n, default) == v for n, v in values.items()):
            return pattern
    raise AdapterFormatError(f"module names {sorted(values)} cannot be told apart by PEFT patterns")


def _lora_config(layers: dict[str, AdapterLayer]) -> dict[str, Any]:
    """A PEFT LoraConfig dict reproducing every layer's rank and scale (names as given)."""
    rslora = all(layer.rslora for layer in layers.values())
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: json_number(layer.alpha if layer.rslora == rslora
                                 else alpha_for_scale(layer.scale, layer.rank, rslora))
              for name, layer in layers.items()}
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "rank_pattern": _patterns(ranks, r), "alpha_pattern": _patterns(alphas, alpha),
        "target_modules": sorted(layers), "use_rslora": rslora,
        "use_dora": any(layer.magnitude is not None for layer in layers.values()),
        "lora_bias": any(layer.bias is not None for layer in layers.values()),
        "lora_dropout": 0.0, "bias": "none", "inference_mode": True,
    }


def _by_component(adapter: Adapter) -> dict[str, dict[str, AdapterLayer]]:
    """A pipeline's layers per component, named relative to it; else ``{"": layers}``."""
    groups: dict[str, dict[str, AdapterLayer]] = {}
    for name, layer in adapter.layers.items():
        component, relative = split_component(name)
        groups.setdefault(component, {})[relative] = layer
    return {"": dict(adapter.layers)} if "" in groups or not adapter.pipeline else groups


def _diffusers_config(adapter: Adapter) -> dict[str, Any]:
    """A plain LoRA config, or one per component with keys prefixed ``<component>.``."""
    groups = _by_component(adapter)
    if "" in groups:
        return {**_lora_config(adapter.layers), **adapter.config}
    return {f"{component}.{key}": value for component, layers in groups.items()
            for key, value in _lora_config(layers).items()}


def _kohya_contents(layers: dict[str, AdapterLayer], path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, names = {}, {}
    two_text_encoders = any(name.startswith("text_encoder_2.") for name in layers)
    for name, layer in layers.items():
        if layer.bias is not None:
            raise AdapterFormatError(f"{path}: layer {name!r} has a lora_B bias, which kohya files cannot hold")
        kohya = kohya_name(name, two_text_encoders)
        if kohya in names:
            raise AdapterFormatError(f"{path}: layers {names[kohya]!r} and {name!r} share kohya name {kohya!r}")
        names[kohya] = name
        alpha = alpha_for_scale(layer.scale, layer.rank, False)
        if alpha == 0.0:
            raise AdapterFormatError(f"{path}: layer {name!r} has scale 0, which kohya files cannot hold: kohya and "
                                     "LyCORIS read alpha 0 as no scaling (alpha = rank)")
        exact = torch.tensor(alpha, dtype=torch.float32).item() == alpha
        tensors[f"{kohya}.lora_down.weight"] = layer.A
        tensors[f"{kohya}.lora_up.weight"] = _up_weight(layer)
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha, dtype=torch.float32 if exact else torch.float64)
        if layer.magnitude is not None:
            tensors[f"{kohya}.dora_scale"] = layer.magnitude.reshape(-1, *[1] * (layer.A.dim() - 1))
    ranks = {layer.rank for layer in layers.values()}
    alphas = {float(tensors[f"{k}.alpha"]) for k in names}
    metadata = {
        "ss_network_module": "networks.lora",
        KOHYA_DIM_KEY: str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        KOHYA_ALPHA_KEY: str(json_number(alphas.pop())) if len(alphas) == 1 else "Dynamic",
    }
    renamed = {kohya: name for kohya, name in names.items() if kohya != name}
    if renamed:
        metadata[NAME_MAP_KEY] = json.dumps(renamed)
    return tensors, metadata
