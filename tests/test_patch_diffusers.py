"""fastlora.patch on a diffusers model: diffusers keeps PEFT's LoRA layers, whether the LoRA
came from ``add_adapter`` or from a LoRA state dict (``load_lora_adapter``, what a
pipeline's ``load_lora_weights`` calls), so a tiny UNet built from a config (CPU, no
download) patched gives the unpatched outputs, with diffusers' adapter weights too."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from fastlora.peft import patch  # noqa: E402
from helpers import assert_close  # noqa: E402
from peft_models import lora_layers  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_unet(device):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2).to(device)


def add_lora(unet, name: str, r: int, seed: int):
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                init_lora_weights=False), adapter_name=name)


def inputs(device):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g).to(device), torch.tensor([10, 500]).to(device),
            torch.randn(2, 3, 8, generator=g).to(device))


def test_lora_from_a_state_dict(device, fused_calls):
    donor = tiny_unet(device)
    add_lora(donor, "a", 4, seed=1)
    state_dict = get_peft_model_state_dict(donor, adapter_name="a")
    unet = tiny_unet(device)
    unet.load_lora_adapter(state_dict, adapter_name="style", prefix=None)
    ref = copy.deepcopy(unet)
    report = patch(unet)
    assert report.all_patched and len(report.patched) == len(lora_layers(unet)) == 32
    x, t, e = inputs(device)
    with torch.no_grad():
        out, exp = unet(x, t, e).sample, ref(x, t, e).sample
        assert len(fused_calls) == 32
        ref.disable_lora()
        base = ref(x, t, e).sample
    assert_close(out, exp, what="UNet output")
    assert (out - base).abs().max() > 1e-3 * base.abs().max(), "the LoRA must change the output"


def test_adapter_weights_and_disable(device, fused_calls):
    unet = tiny_unet(device)
    add_lora(unet, "a", 4, seed=1)
    add_lora(unet, "b", 2, seed=2)
    unet.set_adapters(["a", "b"], weights=[0.5, 1.5])
    ref = copy.deepcopy(unet)
    patch(unet)
    x, t, e = inputs(device)
    with torch.no_grad():
        assert_close(unet(x, t, e).sample, ref(x, t, e).sample, what="weighted adapters")
        assert len(fused_calls) == 32  # both adapters stacked in one call per layer
        for m in (unet, ref):
            m.disable_lora()
        assert_close(unet(x, t, e).sample, ref(x, t, e).sample, what="LoRA disabled")
        assert len(fused_calls) == 32
