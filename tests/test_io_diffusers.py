"""Round trips through diffusers' own code (tiny SD models from configs, CPU, no downloads):
files diffusers writes load in fastlora with the scales diffusers reads, and files fastlora writes
load in diffusers with the right alphas."""
from __future__ import annotations

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from tiny_models import TEXT_TARGETS, UNET_TARGETS, kohya_sd_file, tiny_clip, tiny_unet  # noqa: E402

from fastlora.io import load_adapter, save_adapter  # noqa: E402

Pipeline = diffusers.StableDiffusionPipeline


def lora_layers(model: nn.Module) -> dict[str, tuple[float, torch.Tensor]]:
    """Each LoRA layer's ``(scale, delta weight)`` as PEFT computes them (one adapter, any name)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            (adapter,) = module.scaling
            with torch.no_grad():
                out[name] = (module.scaling[adapter], module.get_delta_weight(adapter))
    return out


def diffusers_reads(path) -> dict[str, tuple[float, torch.Tensor]]:
    """The layers diffusers' loaders build from ``path`` on a fresh UNet and text encoder,
    keyed ``unet.<path>`` / ``text_encoder.<path>``."""
    state_dict, alphas, metadata = Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
    unet, text_encoder = tiny_unet(), tiny_clip()
    Pipeline.load_lora_into_unet(state_dict, alphas, unet, metadata=metadata)
    Pipeline.load_lora_into_text_encoder(state_dict, alphas, text_encoder, metadata=metadata)
    return {f"{component}.{name}": layer for component, model in (("unet", unet), ("text_encoder", text_encoder))
            for name, layer in lora_layers(model).items()}


def assert_same_layers(adapter, read: dict) -> None:
    assert sorted(read) == sorted(adapter.layers)
    for name, (scale, delta) in read.items():
        layer = adapter.layers[name]
        assert layer.scale == pytest.approx(scale, rel=1e-12), name
        torch.testing.assert_close(layer.delta(), delta.float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("alpha_in_metadata", [True, False], ids=["alphas", "no-lora_alpha"])
def test_save_lora_weights_loads_with_diffusers_scales(tmp_path, alpha_in_metadata):
    """diffusers' save_lora_weights with lora_adapter_metadata, rank and alpha patterns."""
    unet, text_encoder = tiny_unet(), tiny_clip()
    torch.manual_seed(1)
    alpha = {"lora_alpha": 6} if alpha_in_metadata else {}
    unet.add_adapter(peft.LoraConfig(r=4, **alpha, rank_pattern={"to_k": 2}, alpha_pattern={"attn1.to_q": 3},
                                     target_modules=["to_q", "to_k", "proj_in", "conv1"], init_lora_weights=False))
    text_encoder = peft.get_peft_model(text_encoder, peft.LoraConfig(
        r=3, lora_alpha=5, rank_pattern={"fc1": 2}, target_modules=["q_proj", "fc1"], init_lora_weights=False))
    metadata = {f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict()
                for name, model in (("unet", unet), ("text_encoder", text_encoder))}
    if not alpha_in_metadata:
        del metadata["unet_lora_adapter_metadata"]["lora_alpha"]
    text_layers = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(text_encoder).items()}
    Pipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                               text_encoder_lora_layers=text_layers, **metadata)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    adapter = load_adapter(path)
    assert adapter.source_format == "diffusers"
    read = diffusers_reads(path)
    assert_same_layers(adapter, read)
    scales = {layer.scale for name, layer in adapter.layers.items() if name.startswith("unet.")}
    assert scales == ({6 / 4, 6 / 2, 3 / 4} if alpha_in_metadata else {8 / 4, 8 / 2, 3 / 4})


def test_fastlora_files_load_in_diffusers(tmp_path):
    """kohya and diffusers files written by fastlora from an adapter bound to a pipeline's
    components: diffusers applies every layer with fastlora's scale and change. Ranks and alphas
    differ per layer in the diffusers file; in the kohya file alphas differ per component only,
    as diffusers 0.42 reads per-layer kohya alphas of attention and text-encoder layers under names
    that match no module (falling back to the most common alpha)."""
    unet, text_encoder = tiny_unet(), tiny_clip()
    kohya_sd_file(tmp_path / "sd.safetensors", unet, text_encoder)
    pipeline = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    adapter = load_adapter(tmp_path / "sd.safetensors", base_model=pipeline)
    assert len({layer.alpha for layer in adapter.layers.values()}) > 3
    save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    assert_same_layers(adapter, diffusers_reads(tmp_path / "d.safetensors"))

    for name, layer in adapter.layers.items():
        layer.alpha = 4.0 if name.startswith("unet.") else 1.5
    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    assert sorted(load_adapter(tmp_path / "k.safetensors").layers) == sorted(adapter.layers)
    read = diffusers_reads(tmp_path / "k.safetensors")
    assert sorted(read) == sorted([f"unet.{p}" for p in UNET_TARGETS] + [f"text_encoder.{p}" for p in TEXT_TARGETS])
    assert_same_layers(adapter, read)
