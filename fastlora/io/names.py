"""Module-name conventions: PEFT's dotted paths, diffusers' component prefixes, kohya's underscores.

kohya names a module by its dotted path with ``.`` replaced by ``_`` behind a prefix naming
the model part: ``lora_unet_`` (diffusers ``unet.``), ``lora_te_`` / ``lora_te1_`` (``text_encoder.``),
``lora_te2_`` / ``lora_te3_`` (``text_encoder_2.`` / ``_3.``), ``lora_transformer_``; this package
writes ``lora_`` plus the whole underscored path for anything else. LyCORIS' own wrapper
(any model) names a module ``lycoris_`` plus its underscored path.

transformers 5 dropped the ``text_model.`` level of ``CLIPTextModel`` (``encoder.layers.0...``
instead of ``text_model.encoder.layers.0...``; ``CLIPTextModelWithProjection`` keeps it), while
Stable Diffusion LoRA files name it (``lora_te_text_model_encoder_...``,
``text_encoder.text_model.encoder...``): names match modules with or without that level.
"""
from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
KOHYA_COMPONENTS = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                    ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"),
                    ("lora_transformer_", "transformer"))
_KOHYA_GENERIC = "lora_"
_GENERIC_PREFIXES = (_KOHYA_GENERIC, "lycoris_")  # kohya's / this package's, LyCORIS' wrapper's
_TEXT_MODEL = "text_model"
_TEXT_MODEL_UNDERSCORED = re.compile(r"(^|_)text_model_")
_CLIP_TOP_LEVEL = ("encoder.layers.", "embeddings.", "final_layer_norm")  # CLIP text model children


def is_kohya_name(name: str) -> bool:
    return "." not in name and name.startswith(_GENERIC_PREFIXES)


def kohya_name(name: str, two_text_encoders: bool = False) -> str:
    """kohya's name for a module: ``unet.down_blocks.0.proj`` -> ``lora_unet_down_blocks_0_proj``,
    ``text_encoder.encoder.layers.0.mlp.fc1`` -> ``lora_te_text_model_encoder_layers_0_mlp_fc1``
    (the CLIP ``text_model`` level written as kohya does; ``lora_te1_`` when
    ``two_text_encoders``, as kohya names SDXL's first one); kohya names stay unchanged."""
    if is_kohya_name(name):
        return name
    head, _, rest = name.partition(".")
    if head in TEXT_ENCODERS and rest:
        if rest.startswith(_CLIP_TOP_LEVEL):
            rest = f"{_TEXT_MODEL}.{rest}"
        prefix = {"text_encoder": "lora_te1_" if two_text_encoders else "lora_te_",
                  "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}[head]
        return prefix + rest.replace(".", "_")
    return _KOHYA_GENERIC + name.replace(".", "_")


def kohya_candidates(name: str) -> list[str]:
    """The underscored module paths a kohya name may stand for, relative to its component or
    to a model holding the components, with and without the CLIP ``text_model`` level:
    ``lora_te1_text_model_x`` -> ``["text_model_x", "text_encoder_text_model_x", "te1_text_model_x",
    "x", "text_encoder_x", "te1_x"]``."""
    found = []
    for prefix, component in KOHYA_COMPONENTS:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            found += [rest, f"{component}_{rest}"]
    found += [name[len(prefix):] for prefix in _GENERIC_PREFIXES if name.startswith(prefix)]
    return list(dict.fromkeys(found + [_TEXT_MODEL_UNDERSCORED.sub(r"\1", c) for c in found]))


def without_text_model(path: str) -> str:
    """``path`` without a ``text_model`` segment: the transformers 5 ``CLIPTextModel`` spelling."""
    return ".".join(part for part in path.split(".") if part != _TEXT_MODEL)


def split_component(name: str) -> tuple[str, str]:
    """``("transformer", "blocks.0.to_q")`` for ``transformer.blocks.0.to_q``; ``("", name)``
    when the first segment is not a diffusers component."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in DIFFUSERS_COMPONENTS and rest else ("", name)
