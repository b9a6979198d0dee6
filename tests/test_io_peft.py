"""fastlora.io against PEFT itself: adapters saved by PEFT load to the same deltas and outputs,
and adapters saved by fastlora.io load in PEFT to the same outputs.

Every LoRA uses ``init_lora_weights=False`` (lora_B is not zero), per-layer rank and alpha
patterns, and alphas different from ranks.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from fastlora.io import load_adapter, save_adapter  # noqa: E402

# PEFT mistakes 1-D lora_B biases for unsharded ZeRO-3 tensors when saving them.
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 8)

    def forward(self, image):
        x = self.conv(image).flatten(2).mean(-1)  # [batch, 4]
        return self.fc2(torch.relu(self.fc1(x.repeat(1, 4))))


def small_model():
    torch.manual_seed(0)
    return Small().eval()


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def peft_save(model, path, **options):
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():  # non-trivial DoRA magnitudes and lora_B biases
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "lora_B" in name and name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(path)
    return peft_model


def merged(model, adapter):
    """``model`` with each layer's LoRA merged into its weight (DoRA: magnitude times the
    row-normalised merged weight; lora_B bias: scale * bias added to the layer bias)."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            module = modules[name]
            weight = module.weight + layer.delta()
            if layer.magnitude is not None:
                dims = tuple(range(1, weight.dim()))
                norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
                weight = layer.magnitude.reshape(-1, *[1] * len(dims)) * weight / norm
            module.weight.copy_(weight)
            if layer.bias is not None:
                module.bias.add_(layer.scale * layer.bias)
    return model


OPTIONS = [
    dict(r=4, lora_alpha=6, rank_pattern={"fc2": 2}, alpha_pattern={"conv": 3}),
    dict(r=4, lora_alpha=6, rank_pattern={"fc1": 3}, alpha_pattern={"fc2": 5}, use_rslora=True),
    dict(r=4, lora_alpha=6, rank_pattern={"fc2": 2}, use_dora=True),
    dict(r=2, lora_alpha=7, alpha_pattern={"fc1": 1}, lora_bias=True),
]


@pytest.mark.parametrize("options", OPTIONS, ids=["patterns", "rslora", "dora", "lora_bias"])
def test_peft_saved_adapter_matches_peft(tmp_path, options):
    peft_model = peft_save(small_model(), tmp_path, target_modules=["conv", "fc1", "fc2"], **options)
    adapter = load_adapter(tmp_path, base_model=small_model())
    assert adapter.source_format == "peft"
    assert sorted(adapter.layers) == ["conv", "fc1", "fc2"]
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            layer = adapter.layers[name]
            assert layer.scale == pytest.approx(module.scaling["default"], rel=1e-12)
            torch.testing.assert_close(layer.delta(), module.get_delta_weight("default"))
    image = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    reloaded = PeftModel.from_pretrained(small_model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(small_model(), adapter)(image), reloaded(image))


@pytest.mark.parametrize("via, options", [
    pytest.param(via, options, id=f"{via}-{name}")
    for via in ("peft", "diffusers", "kohya")
    for name, options in zip(["patterns", "rslora", "dora", "lora_bias"], OPTIONS, strict=True)
    if not (via == "kohya" and options.get("lora_bias"))  # kohya files have no lora_B bias
])
def test_fastlora_saved_adapter_loads_in_peft(tmp_path, via, options):
    """PEFT -> fastlora.io -> (format ``via``) -> fastlora.io -> PEFT directory -> PEFT."""
    peft_model = peft_save(small_model(), tmp_path / "src", target_modules=["conv", "fc1", "fc2"], **options)
    middle = tmp_path / ("mid" if via == "peft" else "mid.safetensors")
    save_adapter(load_adapter(tmp_path / "src"), middle, via)
    save_adapter(load_adapter(middle), tmp_path / "out", "peft")
    reloaded = PeftModel.from_pretrained(small_model(), tmp_path / "out").eval()
    image = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(image), peft_model(image))


def test_config_without_lora_alpha_reads_as_peft_reads_it(tmp_path):
    """An adapter_config.json without lora_alpha: PEFT takes LoraConfig's default (8), so must we."""
    peft_model = peft_save(small_model(), tmp_path, target_modules=["fc1", "fc2"], r=4, lora_alpha=3,
                           rank_pattern={"fc2": 2})
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))
    reloaded = PeftModel.from_pretrained(small_model(), tmp_path)
    adapter = load_adapter(tmp_path, base_model=small_model())
    for name, module in reloaded.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            assert adapter.layers[name].scale == module.scaling["default"] != peft_model.get_submodule(
                "base_model.model." + name).scaling["default"]
    assert adapter.layers["fc2"].scale == 4.0


def test_tiny_llama_matches_peft(tmp_path):
    peft_model = peft_save(tiny_llama(), tmp_path, target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                           lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    adapter = load_adapter(tmp_path, base_model=tiny_llama())
    assert "model.layers.0.self_attn.q_proj" in adapter.layers and len(adapter.layers) == 6
    assert adapter.layers["model.layers.1.self_attn.q_proj"].scale == 0.75
    assert adapter.layers["model.layers.0.self_attn.v_proj"].scale == 4.0
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peft_model(tokens).logits
        torch.testing.assert_close(merged(tiny_llama(), adapter)(tokens).logits, expected)
        save_adapter(adapter, tmp_path / "again", "peft")
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
        torch.testing.assert_close(again(tokens).logits, expected)


def test_peft_model_as_base_model(tmp_path):
    peft_model = peft_save(small_model(), tmp_path, target_modules=["fc1", "fc2"], r=3, lora_alpha=5)
    adapter = load_adapter(tmp_path, base_model=peft_model)
    assert sorted(adapter.layers) == ["fc1", "fc2"]


def tiny_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("via", ["peft", "diffusers", "kohya"])
@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
def test_gpt2_style_adapter_round_trips_as_a_plain_peft_directory(tmp_path, via, bound):
    """GPT-2's modules are ``transformer.h.0...``: its adapter is no diffusers pipeline's, and its
    PEFT output is one plain directory (adapter_config.json at the top) that PEFT loads, through
    every format."""
    peft_model = peft_save(tiny_gpt2(), tmp_path / "src", target_modules=["c_attn", "c_fc"], r=4, lora_alpha=6,
                           rank_pattern={"c_fc": 2}, fan_in_fan_out=True)
    base = {"base_model": tiny_gpt2()} if bound else {}
    adapter = load_adapter(tmp_path / "src", **base)
    assert "transformer.h.0.attn.c_attn" in adapter.layers and not adapter.pipeline
    middle = tmp_path / ("mid" if via == "peft" else "mid.safetensors")
    save_adapter(adapter, middle, via)
    again = load_adapter(middle, **base)
    assert not again.pipeline
    assert save_adapter(again, tmp_path / "out", "peft") == [tmp_path / "out"]
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert not (tmp_path / "out" / "transformer").exists()
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "out").eval()
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, peft_model(tokens).logits)
