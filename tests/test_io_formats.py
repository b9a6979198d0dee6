"""fastlora.io reading files of every format (written here by hand), and round trips.

Alphas differ from ranks and ranks differ per layer everywhere, so a reader that ignores a
pattern, a metadata entry or an ``.alpha`` tensor gets a wrong scale.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fastlora.io import Adapter, AdapterFormatError, AdapterLayer, load_adapter, save_adapter


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ---------------------------------------------------------------- kohya


def kohya_tensors():
    return {
        "lora_unet_down_blocks_0_attn_to_q.lora_down.weight": rand(4, 10, seed=1),
        "lora_unet_down_blocks_0_attn_to_q.lora_up.weight": rand(12, 4, seed=2),
        "lora_unet_down_blocks_0_attn_to_q.alpha": torch.tensor(2.0),
        "lora_unet_down_blocks_0_attn_to_k.lora_down.weight": rand(8, 10, seed=3),
        "lora_unet_down_blocks_0_attn_to_k.lora_up.weight": rand(12, 8, seed=4),
        "lora_unet_down_blocks_0_attn_to_k.alpha": torch.tensor(12.0, dtype=torch.float16),
        "lora_unet_down_blocks_0_attn_to_k.dora_scale": rand(12, 1, seed=5).abs(),
        "lora_unet_conv_in.lora_down.weight": rand(2, 3, 3, 3, seed=6),
        "lora_unet_conv_in.lora_up.weight": rand(5, 2, 1, 1, seed=7),
        "lora_unet_conv_in.alpha": torch.tensor(3.0),
        "lora_unet_proj_out.lora_down.weight": rand(6, 12, seed=8),
        "lora_unet_proj_out.lora_up.weight": rand(7, 6, seed=9),
    }


class TinyUNet(nn.Module):
    """Modules at the paths the kohya names above stand for."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.attn = nn.Module()
        block.attn.to_q, block.attn.to_k = nn.Linear(10, 12), nn.Linear(10, 12)
        self.down_blocks = nn.ModuleList([block])
        self.conv_in = nn.Conv2d(3, 5, 3)
        self.proj_out = nn.Linear(12, 7)


def test_kohya_alphas_names_conv_and_dora(tmp_path):
    tensors = kohya_tensors()
    path = write(tmp_path / "k.safetensors", tensors, {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    adapter = load_adapter(path)
    assert adapter.source_format == "kohya"
    layers = adapter.layers
    assert sorted(layers) == sorted({k.split(".")[0] for k in tensors})
    q, k = layers["lora_unet_down_blocks_0_attn_to_q"], layers["lora_unet_down_blocks_0_attn_to_k"]
    conv, proj = layers["lora_unet_conv_in"], layers["lora_unet_proj_out"]
    assert (q.rank, q.alpha, q.scale) == (4, 2.0, 0.5)
    assert (k.rank, k.alpha, k.scale) == (8, 12.0, 1.5)
    assert (proj.rank, proj.alpha, proj.scale) == (6, 6.0, 1.0)  # no .alpha: alpha = rank
    assert conv.is_conv and conv.A.shape == (2, 3, 3, 3) and conv.B.shape == (5, 2)
    assert torch.equal(k.magnitude, tensors["lora_unet_down_blocks_0_attn_to_k.dora_scale"].reshape(12))
    assert q.magnitude is None and q.bias is None
    expected = 1.5 * tensors["lora_unet_conv_in.lora_up.weight"].flatten(1) @ \
        tensors["lora_unet_conv_in.lora_down.weight"].flatten(1)
    torch.testing.assert_close(conv.delta(), expected.reshape(5, 3, 3, 3))


def test_kohya_layer_without_alpha_takes_its_rank(tmp_path):
    """As kohya's loader, merge_lora.py and resize_lora.py do: ``ss_network_alpha`` is the
    training run's default, not this layer's alpha."""
    tensors = {k: v for k, v in kohya_tensors().items() if "proj_out" in k or "to_q" in k}
    adapter = load_adapter(write(tmp_path / "k.safetensors", tensors, {"ss_network_alpha": "3", "ss_network_dim": "6"}))
    assert adapter.layers["lora_unet_proj_out"].alpha == 6.0
    assert adapter.layers["lora_unet_down_blocks_0_attn_to_q"].alpha == 2.0


def test_kohya_names_map_to_base_model(tmp_path):
    adapter = load_adapter(write(tmp_path / "k.safetensors", kohya_tensors()), base_model=TinyUNet())
    assert sorted(adapter.layers) == ["conv_in", "down_blocks.0.attn.to_k", "down_blocks.0.attn.to_q", "proj_out"]
    assert adapter.layers["down_blocks.0.attn.to_k"].scale == 1.5


# ---------------------------------------------------------------- diffusers


def diffusers_tensors(prefix="transformer."):
    return {
        f"{prefix}blocks.0.to_q.lora_A.weight": rand(4, 10, seed=1),
        f"{prefix}blocks.0.to_q.lora_B.weight": rand(12, 4, seed=2),
        f"{prefix}blocks.0.to_k.lora_A.weight": rand(2, 10, seed=3),
        f"{prefix}blocks.0.to_k.lora_B.weight": rand(12, 2, seed=4),
        f"{prefix}blocks.1.to_k.lora_A.weight": rand(4, 10, seed=5),
        f"{prefix}blocks.1.to_k.lora_B.weight": rand(12, 4, seed=6),
    }


def test_diffusers_prefixed_metadata(tmp_path):
    config = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.rank_pattern": {"blocks.0.to_k": 2},
              "transformer.alpha_pattern": {"blocks.0.to_k": 3, "to_k": 6}, "transformer.use_rslora": False,
              "transformer.target_modules": ["to_q", "to_k"], "transformer.unknown_field": {"x": 1}}
    path = write(tmp_path / "d.safetensors", diffusers_tensors(), {"lora_adapter_metadata": json.dumps(config)})
    adapter = load_adapter(path)
    assert adapter.source_format == "diffusers"
    scales = {name: (layer.rank, layer.alpha, layer.scale) for name, layer in adapter.layers.items()}
    assert scales == {"transformer.blocks.0.to_q": (4, 8.0, 2.0), "transformer.blocks.0.to_k": (2, 3.0, 1.5),
                      "transformer.blocks.1.to_k": (4, 6.0, 1.5)}


def test_diffusers_plain_metadata_with_rslora(tmp_path):
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_k": 2}, "use_rslora": True}
    path = write(tmp_path / "d.safetensors", {k: v for k, v in diffusers_tensors("").items() if "blocks.0" in k},
                 {"lora_adapter_metadata": json.dumps(config)})
    layers = load_adapter(path).layers
    assert layers["blocks.0.to_q"].scale == 8 / 2.0
    assert layers["blocks.0.to_k"].scale == pytest.approx(8 / math.sqrt(2), rel=1e-15)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_diffusers_metadata_without_lora_alpha_means_lora_config_default(tmp_path, prefix):
    """diffusers builds ``LoraConfig(**metadata)``: an absent lora_alpha is LoraConfig's 8."""
    config = {f"{prefix}r": 4, f"{prefix}rank_pattern": {"blocks.0.to_k": 2}, f"{prefix}alpha_pattern": {"to_q": 2}}
    path = write(tmp_path / "d.safetensors", diffusers_tensors(), {"lora_adapter_metadata": json.dumps(config)})
    layers = load_adapter(path).layers
    assert {n: (layer.rank, layer.alpha) for n, layer in layers.items()} == {
        "transformer.blocks.0.to_q": (4, 2.0), "transformer.blocks.0.to_k": (2, 8.0),
        "transformer.blocks.1.to_k": (4, 8.0)}


def test_diffusers_without_metadata_alpha_is_rank(tmp_path):
    adapter = load_adapter(write(tmp_path / "d.safetensors", diffusers_tensors()))
    assert adapter.source_format == "diffusers"
    assert {layer.scale for layer in adapter.layers.values()} == {1.0}
    assert adapter.layers["transformer.blocks.0.to_k"].alpha == 2.0


def test_diffusers_prefix_dropped_for_base_model(tmp_path):
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.blocks:
        block.to_q, block.to_k = nn.Linear(10, 12), nn.Linear(10, 12)
    adapter = load_adapter(write(tmp_path / "d.safetensors", diffusers_tensors()), base_model=model)
    assert sorted(adapter.layers) == ["blocks.0.to_k", "blocks.0.to_q", "blocks.1.to_k"]


@pytest.mark.parametrize("up, down", [("lora.up", "lora.down"), ("lora_linear_layer.up", "lora_linear_layer.down")])
def test_older_diffusers_keys(up, down):
    tensors = {f"unet.mid.to_q.{down}.weight": rand(3, 10), f"unet.mid.to_q.{up}.weight": rand(12, 3, seed=1),
               "unet.mid.to_q.alpha": torch.tensor(6.0)}
    adapter = load_adapter(tensors)
    assert adapter.source_format == "diffusers"
    layer = adapter.layers["unet.mid.to_q"]
    assert (layer.rank, layer.scale) == (3, 2.0)
    assert torch.equal(layer.A, tensors[f"unet.mid.to_q.{down}.weight"])


def test_peft_keys_with_adapter_name_and_without_config():
    tensors = {"base_model.model.l1.lora_A.default.weight": rand(3, 8),
               "base_model.model.l1.lora_B.default.weight": rand(5, 3, seed=1),
               "base_model.model.l1.lora_B.default.bias": rand(5, seed=2)}
    adapter = load_adapter(tensors)
    assert adapter.source_format == "peft"
    layer = adapter.layers["l1"]
    assert (layer.rank, layer.alpha) == (3, 3.0)
    assert torch.equal(layer.bias, tensors["base_model.model.l1.lora_B.default.bias"])


# ---------------------------------------------------------------- Light-LoRA


def test_light_lora_core_is_folded(tmp_path):
    down, mid, up = rand(6, 10, seed=1), rand(4, 6, seed=2), rand(12, 4, seed=3)
    tensors = {"blocks.0.q.lora_down.weight": down, "blocks.0.q.lora_mid.weight": mid,
               "blocks.0.q.lora_up.weight": up, "blocks.0.q.alpha": torch.tensor(3.0)}
    adapter = load_adapter(write(tmp_path / "l.safetensors", tensors))
    assert adapter.source_format == "light-lora"
    layer = adapter.layers["blocks.0.q"]
    assert layer.rank == 4 and layer.scale == 3.0 / 6
    torch.testing.assert_close(layer.delta(), 0.5 * up @ mid @ down)


# ---------------------------------------------------------------- round trips


def sample_adapter(rslora=False, dora=False, bias=False, prefix=""):
    """Three layers with different ranks and alphas, one of them a convolution."""
    shapes = {"model.layers.0.q_proj": (4, (10,), 12, 6.0), "model.layers.0.v_proj": (2, (10,), 12, 5.0),
              "model.conv": (3, (3, 3, 3), 5, 1.5)}
    layers = {}
    for i, (name, (rank, in_shape, out, alpha)) in enumerate(shapes.items()):
        layers[prefix + name] = AdapterLayer(
            A=rand(rank, *in_shape, seed=3 * i), B=rand(out, rank, seed=3 * i + 1), alpha=alpha, rslora=rslora,
            magnitude=rand(out, seed=3 * i + 2).abs() + 0.5 if dora else None,
            bias=rand(out, seed=3 * i + 2) if bias else None)
    return Adapter(layers, "peft", {"base_model_name_or_path": "tiny"})


def saved_path(tmp_path, fmt):
    return tmp_path / ("out" if fmt == "peft" else "out.safetensors")


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
@pytest.mark.parametrize("rslora, dora", [(False, False), (True, False), (False, True)])
def test_round_trip_keeps_names_factors_and_scales(tmp_path, fmt, rslora, dora):
    adapter = sample_adapter(rslora=rslora, dora=dora)
    save_adapter(adapter, saved_path(tmp_path, fmt), fmt)
    loaded = load_adapter(saved_path(tmp_path, fmt))
    assert loaded.source_format == fmt
    assert sorted(loaded.layers) == sorted(adapter.layers)
    for name, layer in adapter.layers.items():
        back = loaded.layers[name]
        assert back.scale == layer.scale, name
        assert torch.equal(back.A, layer.A) and torch.equal(back.B, layer.B)
        assert (back.magnitude is None) == (not dora)
        if dora:
            assert torch.equal(back.magnitude, layer.magnitude)


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_round_trip_keeps_lora_b_bias_and_config(tmp_path, fmt):
    adapter = sample_adapter(bias=True)
    save_adapter(adapter, saved_path(tmp_path, fmt), fmt)
    loaded = load_adapter(saved_path(tmp_path, fmt))
    for name, layer in adapter.layers.items():
        assert torch.equal(loaded.layers[name].bias, layer.bias)
    assert loaded.config["base_model_name_or_path"] == "tiny"


def test_saved_files_state_alpha_explicitly(tmp_path):
    adapter = sample_adapter()
    save_adapter(adapter, tmp_path / "peft", "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 6)
    assert config["rank_pattern"] == {"model.layers.0.v_proj": 2, "model.conv": 3}
    assert config["alpha_pattern"] == {"model.layers.0.v_proj": 5, "model.conv": 1.5}
    header = json.loads(read_metadata(tmp_path / "peft" / "adapter_model.safetensors")["lora_adapter_metadata"])
    assert header["alpha_pattern"] == config["alpha_pattern"]

    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.get_tensor("lora_model_layers_0_v_proj.alpha").item() == 5.0
        assert f.get_slice("lora_model_conv.lora_up.weight").get_shape() == [5, 3, 1, 1]
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_patterns_distinguish_names_that_end_alike(tmp_path):
    """A pattern for ``q`` would also match ``attn.q``: the saved config must still give each
    layer its own rank and alpha."""
    layers = {"q": AdapterLayer(rand(2, 4), rand(4, 2), 2.0), "attn.q": AdapterLayer(rand(4, 4), rand(4, 4), 8.0),
              "attn.k": AdapterLayer(rand(4, 4), rand(4, 4), 8.0)}
    save_adapter(Adapter(layers, "peft"), tmp_path / "p", "peft")
    loaded = load_adapter(tmp_path / "p")
    assert {n: (layer.rank, layer.alpha) for n, layer in loaded.layers.items()} == \
        {"q": (2, 2.0), "attn.q": (4, 8.0), "attn.k": (4, 8.0)}


def test_diffusers_save_prefixes_metadata_per_component(tmp_path):
    adapter = dataclasses.replace(sample_adapter(prefix="transformer."), pipeline=True)
    save_adapter(adapter, tmp_path / "d.safetensors", "diffusers")
    config = json.loads(read_metadata(tmp_path / "d.safetensors")["lora_adapter_metadata"])
    assert config["transformer.r"] == 4
    assert config["transformer.alpha_pattern"] == {"model.layers.0.v_proj": 5, "model.conv": 1.5}
    loaded = load_adapter(tmp_path / "d.safetensors")
    assert {n: layer.scale for n, layer in loaded.layers.items()} == \
        {n: layer.scale for n, layer in adapter.layers.items()}


def test_kohya_source_bound_to_a_pipeline_round_trips_through_peft_and_kohya(tmp_path):
    """Bound to a pipeline's components, kohya names become ``unet.<path>``: PEFT output is one
    directory per component (PEFT wraps one model), kohya output gets the original names back."""
    tensors = {k: v for k, v in kohya_tensors().items() if not k.endswith("dora_scale")}
    pipeline = nn.ModuleDict({"unet": TinyUNet()})
    original = load_adapter(write(tmp_path / "k.safetensors", tensors), base_model=pipeline)
    assert sorted(original.layers) == ["unet.conv_in", "unet.down_blocks.0.attn.to_k", "unet.down_blocks.0.attn.to_q",
                                       "unet.proj_out"]
    assert save_adapter(original, tmp_path / "peft", "peft") == [tmp_path / "peft" / "unet"]
    with pytest.raises(AdapterFormatError, match="unet/: load one of them"):
        load_adapter(tmp_path / "peft")
    in_peft = load_adapter(tmp_path / "peft" / "unet", base_model=TinyUNet())
    assert sorted(in_peft.layers) == [name.removeprefix("unet.") for name in sorted(original.layers)]
    save_adapter(original, tmp_path / "k2.safetensors", "kohya")
    with safe_open(str(tmp_path / "k2.safetensors"), "pt") as f:
        assert set(f.keys()) == set(tensors) | {"lora_unet_proj_out.alpha"}  # alphas are written explicitly
    again = load_adapter(tmp_path / "k2.safetensors")
    assert sorted(again.layers) == sorted(original.layers)
    for name, layer in original.layers.items():
        assert again.layers[name].scale == in_peft.layers[name.removeprefix("unet.")].scale == layer.scale
        assert torch.equal(again.layers[name].B, layer.B)


@pytest.mark.parametrize("names", [
    {"unet.mid.to_q": "lora_unet_mid_to_q", "text_encoder.text_model.q": "lora_te_text_model_q",
     "text_encoder.encoder.layers.0.mlp.fc1": "lora_te_text_model_encoder_layers_0_mlp_fc1",
     "model.proj": "lora_model_proj", "lora_unet_x": "lora_unet_x"},
    {"text_encoder.text_model.q": "lora_te1_text_model_q", "text_encoder_2.text_model.q": "lora_te2_text_model_q",
     "text_encoder_2.encoder.layers.1.self_attn.q_proj": "lora_te2_text_model_encoder_layers_1_self_attn_q_proj",
     "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q": "lora_te3_encoder_block_0_layer_0_SelfAttention_q"},
], ids=["sd1", "sdxl"])
def test_kohya_names_written(tmp_path, names):
    """kohya's prefixes; CLIP text encoders named with their ``text_model`` level as kohya does
    (transformers 5 dropped it), ``lora_te1_`` beside a second text encoder (SDXL)."""
    layer = AdapterLayer(rand(2, 4), rand(4, 2), 2.0)
    save_adapter(Adapter(dict.fromkeys(names, layer), "peft"), tmp_path / "k.safetensors", "kohya")
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert {key.split(".")[0] for key in f.keys()} == set(names.values())
    assert sorted(load_adapter(tmp_path / "k.safetensors").layers) == sorted(names)


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_unbound_kohya_names_are_not_written_as_module_paths(tmp_path, fmt):
    """``lora_unet_down_blocks_0_attn_to_q`` does not say where the dots go: PEFT and diffusers
    files written from it would not load. Binding to a base model fixes the names."""
    tensors = {k: v for k, v in kohya_tensors().items() if not k.endswith("dora_scale")}
    adapter = load_adapter(write(tmp_path / "k.safetensors", tensors))
    with pytest.raises(AdapterFormatError, match="kohya's underscored names.*base_model"):
        save_adapter(adapter, saved_path(tmp_path, fmt), fmt)
    assert not saved_path(tmp_path, fmt).exists()
    bound = load_adapter(tmp_path / "k.safetensors", base_model=TinyUNet())
    save_adapter(bound, saved_path(tmp_path, fmt), fmt)
    assert sorted(load_adapter(saved_path(tmp_path, fmt)).layers) == sorted(bound.layers)


def test_kohya_cannot_hold_lora_b_bias(tmp_path):
    with pytest.raises(AdapterFormatError, match="bias"):
        save_adapter(sample_adapter(bias=True), tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()


# ---------------------------------------------------------------- mixed files


def test_non_adapter_tensors_are_skipped_with_a_warning_or_refused_when_strict(tmp_path, capsys):
    """A kohya LoRA with an embedded textual inversion (kohya's ``bundle_emb``) and an ``ss_*``
    tensor: the LoRA part loads, the warning names what was left out; ``strict=True`` refuses."""
    from fastlora.io import SkippedTensorsWarning
    from fastlora.io.cli import main

    extra = {"bundle_emb.mytoken.string_to_param.*": rand(2, 8, seed=11), "ss_tag_frequency": torch.tensor([3.0])}
    path = write(tmp_path / "mixed.safetensors", kohya_tensors() | extra)
    with pytest.warns(SkippedTensorsWarning, match=r"skipped 2 .*'bundle_emb\.mytoken\.string_to_param\.\*'.*"
                                                   r"'ss_tag_frequency'"):
        adapter = load_adapter(path)
    assert sorted(adapter.skipped) == sorted(extra) and len(adapter.layers) == 4
    with pytest.raises(AdapterFormatError, match="2 tensors are not adapter weights: 'bundle_emb"):
        load_adapter(path, strict=True)
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "skipped:     2 non-adapter tensors" in out
    assert err.count("\n") == 1 and err.startswith("fastlora inspect: warning: ") and "bundle_emb" in err
    assert main(["inspect", str(path), "--strict"]) == 2
    assert "not adapter weights" in capsys.readouterr().err
    with pytest.raises(AdapterFormatError, match="no adapter tensors: 'bundle_emb"):
        load_adapter(extra)
