"""Stable Diffusion text-encoder LoRAs bind to CLIP text models with or without the
``text_model.`` level (transformers 5's ``CLIPTextModel`` dropped it; ``CLIPTextModelWithProjection``
keeps it), from kohya names (``lora_te_``, ``lora_te1_`` / ``lora_te2_``) and diffusers names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fastlora.io import AdapterFormatError, AdapterShapeError, load_adapter  # noqa: E402

HIDDEN, FFN = 16, 24


def clip(with_projection: bool):
    config = transformers.CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                         projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config)


def paths(model) -> set[str]:
    return {name for name, _ in model.named_modules()}


def lora(prefix: str, join: str, seed: int, suffixes=("lora_down.weight", "lora_up.weight")) -> dict:
    """LoRA tensors on layer 1's q_proj and fc2 (shapes differ) with the given name spelling."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_in, n_out) in {"self_attn.q_proj": (HIDDEN, HIDDEN), "mlp.fc2": (FFN, HIDDEN)}.items():
        name = prefix + join.join(["encoder", "layers", "1", *module.split(".")])
        tensors[f"{name}.{suffixes[0]}"] = torch.randn(3, n_in, generator=g)
        tensors[f"{name}.{suffixes[1]}"] = torch.randn(n_out, 3, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(6.0)
    return tensors


def test_transformers_layouts():
    assert "encoder.layers.1.mlp.fc2" in paths(clip(False))  # transformers 5: no text_model level
    assert "text_model.encoder.layers.1.mlp.fc2" in paths(clip(True))


@pytest.mark.parametrize("with_projection", [False, True], ids=["CLIPTextModel", "WithProjection"])
@pytest.mark.parametrize("prefix, join, suffixes", [
    ("lora_te_text_model_", "_", ("lora_down.weight", "lora_up.weight")),      # kohya SD 1.x
    ("lora_te1_text_model_", "_", ("lora_down.weight", "lora_up.weight")),     # kohya SDXL, first encoder
    ("text_encoder.text_model.", ".", ("lora_A.weight", "lora_B.weight")),     # diffusers / PEFT
    ("text_encoder.text_model.", ".", ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")),
    ("text_encoder.", ".", ("lora_A.weight", "lora_B.weight")),                # written under transformers 5
], ids=["kohya-te", "kohya-te1", "diffusers", "old-diffusers", "no-text-model"])
def test_text_encoder_lora_binds_to_either_layout(with_projection, prefix, join, suffixes):
    model = clip(with_projection)
    tensors = lora(prefix, join, seed=1, suffixes=suffixes)
    adapter = load_adapter(tensors, base_model=model)
    level = "text_model." if with_projection else ""
    assert sorted(adapter.layers) == [f"{level}encoder.layers.1.mlp.fc2", f"{level}encoder.layers.1.self_attn.q_proj"]
    layer = adapter.layers[f"{level}encoder.layers.1.mlp.fc2"]
    assert (layer.rank, layer.scale) == (3, 2.0)
    assert layer.delta().shape == model.get_submodule(f"{level}encoder.layers.1.mlp.fc2").weight.shape


def test_sdxl_pipeline_components():
    """kohya's lora_te1_ / lora_te2_ and diffusers' text_encoder_2. bind into a pipeline's components."""
    pipeline = nn.ModuleDict({"text_encoder": clip(False), "text_encoder_2": clip(True)})
    tensors = lora("lora_te1_text_model_", "_", seed=1) | lora("lora_te2_text_model_", "_", seed=2)
    adapter = load_adapter(tensors, base_model=pipeline)
    assert sorted(adapter.layers) == [
        "text_encoder.encoder.layers.1.mlp.fc2", "text_encoder.encoder.layers.1.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc2", "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj"]
    assert torch.equal(adapter.layers["text_encoder_2.text_model.encoder.layers.1.mlp.fc2"].A,
                       tensors["lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_down.weight"])
    diffusers_names = lora("text_encoder_2.text_model.", ".", seed=3, suffixes=("lora_A.weight", "lora_B.weight"))
    bound = load_adapter(diffusers_names, base_model=pipeline)
    assert sorted(bound.layers) == sorted(n for n in adapter.layers if n.startswith("text_encoder_2."))


def test_wrong_model_or_shapes_still_refused():
    unet_only = nn.ModuleDict({"unet": nn.Module()})
    with pytest.raises(AdapterFormatError, match="matches no module.*'text_encoder'.*nn.ModuleDict"):
        load_adapter(lora("lora_te_text_model_", "_", seed=1), base_model=unet_only)
    tensors = lora("lora_te_text_model_", "_", seed=1)
    tensors["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight"] = torch.randn(3, HIDDEN)
    with pytest.raises(AdapterShapeError, match="encoder.layers.1.mlp.fc2"):
        load_adapter(tensors, base_model=clip(False))
