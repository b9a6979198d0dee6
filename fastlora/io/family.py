"""A guess of the base model an adapter was trained on, from its layer names (and, for a
Stable Diffusion UNet, the width of its cross-attention inputs: 768 for SD 1.x, 1024 for
SD 2.x, 2048 for SDXL). Shown by ``inspect``; never used to load or bind anything."""
from __future__ import annotations

import re

_CROSS_ATTENTION_KEY = re.compile(r"attn2[._]to_k$")
_UNET_WIDTHS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}
# (pattern searched in the layer names, one per line; family), first match wins
_RULES = (
    (r"single_transformer_blocks|(^|[._])(single|double)_blocks[._]", "Flux"),
    (r"joint_blocks|^lora_te3_|^text_encoder_3\.", "Stable Diffusion 3"),
    (r"^lora_te[12]_|^text_encoder_2\.|input_blocks[._]\d+[._]\d+|label_emb|add_embedding", "Stable Diffusion XL"),
    (r"^lora_unet_|^unet\.|(^|[._])(down|up)_blocks[._]\d+[._](attentions|resnets)", "Stable Diffusion 1.x/2.x"),
    (r"^lora_te_|^text_encoder\.|(^|[._])text_model[._]encoder", "CLIP text encoder (Stable Diffusion)"),
    (r"(^|[._])layers[._]\d+[._](self_attn[._][qkvo]_proj|mlp[._](gate|up|down)_proj)",
     "Llama-style decoder (Llama, Mistral, Qwen, ...)"),
    (r"(^|[._])h[._]\d+[._](attn[._]c_attn|mlp[._]c_fc)", "GPT-2-style decoder"),
    (r"(^|[._])block[._]\d+[._]layer[._]\d+[._](SelfAttention|EncDecAttention|DenseReluDense)", "T5"),
    (r"(^|[._])layer[._]\d+[._]attention[._]self[._](query|key|value)", "BERT-style encoder"),
)


def guess_family(layers: dict) -> str:
    """The likely base model of ``layers`` (name -> layer), or ``"unknown"``."""
    names = "\n".join(layers)
    family = next((label for pattern, label in _RULES if re.search(pattern, names, re.MULTILINE)), "unknown")
    if family.startswith("Stable Diffusion") and family != "Stable Diffusion 3":
        widths = {layer.in_shape[0] for name, layer in layers.items() if _CROSS_ATTENTION_KEY.search(name)}
        if len(widths) == 1 and widths <= _UNET_WIDTHS.keys():
            family = _UNET_WIDTHS[widths.pop()]
    return family
