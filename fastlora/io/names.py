"""Module-name conventions: PEFT's dotted paths, diffusers' component prefixes, kohya's underscores.

kohya names a module by its dotted path with ``.`` replaced by ``_`` behind a prefix naming
the model part: ``lora_unet_`` (diffusers ``unet.``), ``lora_te_`` / ``lora_te1_`` /
``lora_te2_`` / ``lora_te3_`` (text encoders), ``lora_transformer_``; this package writes
``lora_`` plus the whole underscored path for anything else.
"""
from __future__ import annotations

PEFT_PREFIX = "base_model.model."
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_", "lora_")
_KOHYA_TEXT_ENCODERS = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}


def is_kohya_name(name: str) -> bool:
    return "." not in name and name.startswith("lora_")


def kohya_name(name: str) -> str:
    """kohya's name for a module: ``unet.down_blocks.0.proj`` -> ``lora_unet_down_blocks_0_proj``,
    ``text_encoder.text_model.q`` -> ``lora_te_text_model_q``; kohya names stay unchanged."""
    if is_kohya_name(name):
        return name
    head, _, rest = name.partition(".")
    if head in _KOHYA_TEXT_ENCODERS and rest:
        return f"{_KOHYA_TEXT_ENCODERS[head]}_{rest.replace('.', '_')}"
    return "lora_" + name.replace(".", "_")


def kohya_candidates(name: str) -> list[str]:
    """The underscored module paths a kohya name may stand for, one per matching prefix:
    ``lora_unet_x_y`` -> ``["x_y", "unet_x_y"]``."""
    return [name[len(prefix):] for prefix in KOHYA_PREFIXES if name.startswith(prefix)]


def split_component(name: str) -> tuple[str, str]:
    """``("transformer", "blocks.0.to_q")`` for ``transformer.blocks.0.to_q``; ``("", name)``
    when the first segment is not a diffusers component."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in DIFFUSERS_COMPONENTS and rest else ("", name)
