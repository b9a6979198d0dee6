"""Tiny Stable-Diffusion-like models built from configs (no download), and LoRA files named as
kohya writes them, for the adapter-file tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

HIDDEN = 16  # the text encoder's width = the UNet's cross-attention width
UNET_CONFIG = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN,
                   attention_head_dim=2, norm_num_groups=4)
UNET_TARGETS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
                "down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
                "down_blocks.1.resnets.0.conv1")
TEXT_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.1.mlp.fc1")


def clip_config():
    import transformers

    return transformers.CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                       projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_unet(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()


def tiny_clip(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.CLIPTextModel(clip_config()).eval()


def pipeline_dir(path: Path) -> Path:
    """A diffusers pipeline directory holding only the configs of a UNet and a text encoder."""
    import diffusers

    diffusers.UNet2DConditionModel(**UNET_CONFIG).save_config(path / "unet")
    clip_config().save_pretrained(path / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def weight_shape(model: nn.Module, path: str) -> tuple[int, ...]:
    return tuple(model.get_submodule(path).weight.shape)


def kohya_sd_file(path: Path, unet: nn.Module, text_encoder: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya SD 1.x LoRA (LoCon on the conv layers) on ``UNET_TARGETS`` and ``TEXT_TARGETS``,
    ranks 2..4, alphas != ranks (one layer without alpha), written to ``path``; returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = [("lora_unet_", unet, p) for p in UNET_TARGETS] + \
              [("lora_te_text_model_", text_encoder, p) for p in TEXT_TARGETS]
    for i, (prefix, model, module) in enumerate(targets):
        out, *inp = weight_shape(model, module)
        rank, name = 2 + i % 3, prefix + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, *inp, generator=g) / 4
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, *[1] * (len(inp) - 1), generator=g) / 4
        if i != 1:
            tensors[f"{name}.alpha"] = torch.tensor(float(i + 1))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_alpha": "1"})
    return tensors
