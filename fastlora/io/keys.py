"""Tensor-key conventions: which module, and which role in it, a key holds.

Roles: ``A`` (down projection), ``B`` (up projection), ``bias`` (PEFT ``lora_B.bias``),
``magnitude`` (DoRA), ``alpha`` (scalar), ``mid`` (a core between down and up: Light-LoRA,
LoCon's Tucker core), and the LyCORIS factors named as in the file (``hada_w1_a``, ...,
``lokr_w2_b``, see :mod:`fastlora.io.lycoris`). Key families, one per file:

* ``peft``: ``<m>.lora_A.weight``, ``<m>.lora_B.weight``, ``<m>.lora_B.bias``,
  ``<m>.lora_magnitude_vector`` (PEFT and diffusers); an adapter name may sit before
  ``.weight`` / ``.bias`` (``lora_A.default.weight``).
* ``kohya``: ``<m>.lora_down.weight``, ``<m>.lora_up.weight``, ``<m>.lora_mid.weight``,
  ``<m>.dora_scale``, and LyCORIS' ``<m>.hada_*`` / ``<m>.lokr_*``.
* ``dotted``: ``<m>.lora.down.weight`` / ``<m>.lora.up.weight`` and
  ``<m>.lora_linear_layer.down.weight`` / ``.up.weight`` (older diffusers).

``<m>.alpha`` may appear in any family. Other keys are either adapter tensors of a kind not
read here (OFT, IA3, ...: an error) or not adapter tensors at all (an embedded textual
inversion, ``ss_*`` metadata tensors: returned as skipped).
"""
from __future__ import annotations

import re

from .errors import AdapterFormatError
from .lycoris import LOHA_ROLES, LOKR_ROLES

A, B, BIAS, MAGNITUDE, ALPHA, MID = "A", "B", "bias", "magnitude", "alpha", "mid"
PEFT_KEYS, KOHYA_KEYS, DOTTED_KEYS = "peft", "kohya", "dotted"

_NAME = r"(?:\.(?P<adapter>[^.]+))?"  # PEFT's optional adapter name
_SUFFIXES: tuple[tuple[re.Pattern, str | None, str | None], ...] = (
    (re.compile(rf"lora_A{_NAME}\.weight"), A, PEFT_KEYS),
    (re.compile(rf"lora_B{_NAME}\.weight"), B, PEFT_KEYS),
    (re.compile(rf"lora_B{_NAME}\.bias"), BIAS, PEFT_KEYS),
    (re.compile(r"lora_magnitude_vector(?:\.(?P<adapter>(?!weight$)[^.]+))?(?:\.weight)?"),
     MAGNITUDE, PEFT_KEYS),
    (re.compile(r"lora_down\.weight"), A, KOHYA_KEYS),
    (re.compile(r"lora_up\.weight"), B, KOHYA_KEYS),
    (re.compile(r"lora_mid\.weight"), MID, KOHYA_KEYS),
    (re.compile(r"dora_scale"), MAGNITUDE, KOHYA_KEYS),
    (re.compile("|".join(LOHA_ROLES + LOKR_ROLES)), None, KOHYA_KEYS),  # role: the key's last part
    (re.compile(r"(?:lora|lora_linear_layer)\.down\.weight"), A, DOTTED_KEYS),
    (re.compile(r"(?:lora|lora_linear_layer)\.up\.weight"), B, DOTTED_KEYS),
    (re.compile(r"alpha"), ALPHA, None),
)
_ADAPTER_TAGS = ("lora", "hada_", "lokr_", "oft_", "boft_", "glora", "ia3", ".diff")


def split_key(key: str) -> tuple[str, str, str | None, str | None] | None:
    """``(module, role, family, adapter_name)`` for a known key, else None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        suffix = ".".join(parts[i:])
        for pattern, role, family in _SUFFIXES:
            match = pattern.fullmatch(suffix)
            if match:
                adapter = match.groupdict().get("adapter")
                return ".".join(parts[:i]), role or suffix, family, adapter
    return None


def group_keys(keys, label: str) -> tuple[dict[str, dict[str, str]], str, list[str]]:
    """Group tensor keys by module: ``({module: {role: key}}, family, skipped keys)``.

    Raises :class:`AdapterFormatError` for an adapter key of an unsupported kind, a role given
    twice, keys from two families, or two adapter names in one file.
    """
    modules: dict[str, dict[str, str]] = {}
    families: dict[str, str] = {}
    adapters: dict[str, str] = {}
    skipped: list[str] = []
    for key in keys:
        parsed = split_key(key)
        if parsed is None:
            if any(tag in key.lower() for tag in _ADAPTER_TAGS):
                raise AdapterFormatError(
                    f"{label}: {key!r} is an adapter tensor of a kind fastlora does not read (it reads LoRA, "
                    "LoCon, LoHa, LoKr and DoRA; not OFT, BOFT, IA3, GLoRA, full-weight diffs or LoRA on "
                    "embeddings)")
            skipped.append(key)
            continue
        module, role, family, adapter = parsed
        roles = modules.setdefault(module, {})
        if role in roles:
            raise AdapterFormatError(f"{label}: keys {roles[role]!r} and {key!r} both give {role} of {module!r}")
        roles[role] = key
        if family is not None:
            families.setdefault(family, key)
        if adapter is not None:
            adapters.setdefault(adapter, key)
    if not modules:
        found = f": {', '.join(repr(k) for k in skipped[:3])}{', ...' if len(skipped) > 3 else ''}" if skipped else ""
        raise AdapterFormatError(f"{label}: no adapter tensors{found}")
    if len(families) > 1:
        raise AdapterFormatError(f"{label}: keys mix conventions: {sorted(families.values())}")
    if len(adapters) > 1:
        raise AdapterFormatError(
            f"{label}: tensors of several adapters ({', '.join(sorted(adapters))}); save one adapter per file")
    if not families:
        raise AdapterFormatError(f"{label}: only alpha tensors, no LoRA weights")
    return modules, next(iter(families)), skipped
