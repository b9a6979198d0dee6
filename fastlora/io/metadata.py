"""Untrusted configs and header metadata: only known keys are read, each type-checked.

Sources: a PEFT ``adapter_config.json``; diffusers' ``lora_adapter_metadata`` header entry
(a JSON LoRA config, either plain or with every key prefixed by a component such as
``transformer.r``); and ``fastlora_module_names``, the module-name map this package writes
into kohya files. Both configs become a ``peft.LoraConfig`` in PEFT and diffusers, so an
absent ``lora_alpha`` means that class's default, :data:`LORA_CONFIG_DEFAULT_ALPHA`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterFormatError

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KOHYA_ALPHA_KEY = "ss_network_alpha"
KOHYA_DIM_KEY = "ss_network_dim"
NAME_MAP_KEY = "fastlora_module_names"
SETTINGS_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type")
LORA_CONFIG_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's lora_alpha default
PASSTHROUGH_FIELDS = {"base_model_name_or_path": str, "task_type": str, "fan_in_fan_out": bool}


def pattern_matches(pattern: str, name: str) -> bool:
    """PEFT's rule: ``pattern`` (a regex) matches ``name`` or a dotted suffix of it."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


@dataclass(frozen=True)
class LoraSettings:
    """Checked LoRA settings of one config: default ``r`` (None if absent) / ``lora_alpha``,
    per-module ``rank_pattern`` / ``alpha_pattern`` (PEFT regex keys, first match wins), rsLoRA."""

    r: int | None = None
    lora_alpha: float = LORA_CONFIG_DEFAULT_ALPHA
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def rank_for(self, name: str) -> int | None:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.lora_alpha)


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first pattern matching ``name`` (PEFT's order), else ``default``."""
    return next((value for key, value in patterns.items() if pattern_matches(key, name)), default)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _checked_pattern(obj: Any, where: str, is_value) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, value in obj.items():
        if not is_value(value):
            raise AdapterFormatError(f"{where}[{key!r}]: invalid value {value!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterFormatError(f"{where}: key {key!r} is not a valid pattern ({e})") from e
    return dict(obj)


def parse_settings(config: dict[str, Any], where: str) -> LoraSettings:
    """Check and extract the LoRA fields of a PEFT-style config; ``where`` names it in errors."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{where}: peft_type is {peft_type!r}, not a LoRA adapter")
    r = config.get("r")
    if r is not None and not _is_rank(r):
        raise AdapterFormatError(f"{where}: 'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if alpha is not None and not _is_number(alpha):
        raise AdapterFormatError(f"{where}: 'lora_alpha' must be a finite number, got {alpha!r}")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterFormatError(f"{where}: 'use_rslora' must be true or false, got {rslora!r}")
    return LoraSettings(
        r=r, lora_alpha=LORA_CONFIG_DEFAULT_ALPHA if alpha is None else float(alpha),
        rank_pattern=_checked_pattern(config.get("rank_pattern"), f"{where}: rank_pattern", _is_rank),
        alpha_pattern={k: float(v) for k, v in _checked_pattern(
            config.get("alpha_pattern"), f"{where}: alpha_pattern", _is_number).items()},
        use_rslora=rslora)


def passthrough_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The format-independent fields worth keeping (``PASSTHROUGH_FIELDS``), type-checked;
    null values are dropped."""
    kept = {}
    for name, kind in PASSTHROUGH_FIELDS.items():
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, kind):
            raise AdapterFormatError(f"{where}: {name!r} must be a {kind.__name__}, got {value!r}")
        kept[name] = value
    return kept


def _header_json(metadata: dict[str, str], key: str, label: str) -> Any:
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{label}: header metadata {key!r} is not valid JSON ({e})") from e


def diffusers_config(metadata: dict[str, str], label: str) -> tuple[dict[str, LoraSettings], dict[str, Any]]:
    """``lora_adapter_metadata`` as ``(settings by component, passthrough fields)``.

    A plain config gives ``{"": settings}``; a prefixed one ``{"transformer": settings, ...}``
    (its passthrough fields are not read). Both are empty when the entry is absent.
    """
    if DIFFUSERS_METADATA_KEY not in metadata:
        return {}, {}
    config = _header_json(metadata, DIFFUSERS_METADATA_KEY, label)
    where = f"{label}: header metadata {DIFFUSERS_METADATA_KEY!r}"
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if any(name in config for name in SETTINGS_FIELDS):
        return {"": parse_settings(config, where)}, passthrough_config(config, where)
    components: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        component, _, name = key.rpartition(".")
        if component and name in SETTINGS_FIELDS:
            components.setdefault(component, {})[name] = value
    return {c: parse_settings(fields, f"{where} ({c})") for c, fields in components.items()}, {}


def kohya_name_map(metadata: dict[str, str], label: str) -> dict[str, str]:
    """``fastlora_module_names``: kohya name -> dotted module name; ``{}`` when absent."""
    if NAME_MAP_KEY not in metadata:
        return {}
    names = _header_json(metadata, NAME_MAP_KEY, label)
    if not isinstance(names, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise AdapterFormatError(f"{label}: header metadata {NAME_MAP_KEY!r} must map strings to strings")
    return names
