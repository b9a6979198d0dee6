"""Bad adapter files: each raises the right error, naming the file and the key at fault."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastlora.io import (
    Adapter,
    AdapterFormatError,
    AdapterLayer,
    AdapterShapeError,
    NonFiniteWeightError,
    UnsafeFileError,
    load_adapter,
    save_adapter,
)


def good():
    return {"m.lora_A.weight": torch.randn(4, 8), "m.lora_B.weight": torch.randn(6, 4),
            "n.lora_A.weight": torch.randn(2, 8), "n.lora_B.weight": torch.randn(6, 2)}


def write(tmp_path, tensors, metadata=None, name="a.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def expect(error, source, *fragments, **kwargs):
    """Load ``source`` expecting ``error``; every fragment must appear in the message."""
    with pytest.raises(error) as info:
        load_adapter(source, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, message
    return info.value


def test_truncated_and_garbage_files(tmp_path):
    path = write(tmp_path, good())
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    expect(AdapterFormatError, path, path, "truncated")
    path.write_bytes(data[:5])
    expect(AdapterFormatError, path, path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    expect(AdapterFormatError, path, path)


def test_missing_paths(tmp_path):
    error = expect(FileNotFoundError, tmp_path / "nope.safetensors", "no such file")
    assert error.filename == str(tmp_path / "nope.safetensors")
    expect(AdapterFormatError, tmp_path, "adapter_config.json")


def test_rank_mismatch_between_a_and_b(tmp_path):
    tensors = good()
    tensors["n.lora_B.weight"] = torch.randn(6, 3)
    expect(AdapterShapeError, write(tmp_path, tensors), "n.lora_A.weight", "n.lora_B.weight", "ranks disagree")


def test_shapes_checked_against_base_model(tmp_path):
    model = nn.Module()
    model.m, model.n = nn.Linear(8, 6), nn.Linear(8, 5)
    path = write(tmp_path, good())
    expect(AdapterShapeError, path, path, "n.lora_A.weight", "'n'", "[5, r]", base_model=model)
    model.n = nn.Linear(8, 6)
    assert sorted(load_adapter(path, base_model=model).layers) == ["m", "n"]
    del model.n
    expect(AdapterFormatError, path, "'n'", "no module", base_model=model)
    model.n = nn.Embedding(8, 6)
    expect(AdapterFormatError, path, "Embedding", base_model=model)


def test_conv_shapes_checked_against_base_model():
    model = nn.Module()
    model.c = nn.Conv2d(3, 6, 3)
    tensors = {"c.lora_A.weight": torch.randn(2, 3, 5, 5), "c.lora_B.weight": torch.randn(6, 2, 1, 1)}
    expect(AdapterShapeError, tensors, "<state dict>", "c.lora_A.weight", "[r, 3, 3, 3]", base_model=model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_and_alphas(tmp_path, bad):
    tensors = good()
    tensors["n.lora_B.weight"][1, 1] = bad
    expect(NonFiniteWeightError, write(tmp_path, tensors), "n.lora_B.weight", "layer 'n'")
    tensors = good() | {"n.alpha": torch.tensor(bad)}
    expect(NonFiniteWeightError, write(tmp_path, tensors), "n.alpha")


@pytest.mark.parametrize("key", ["base_model.model.m.lora_embedding_A", "lora_unet_m.oft_blocks", "m.diff",
                                 "lora_te_x.lokr_t1", "lora_unet_m.something_else"])
def test_adapter_keys_of_unsupported_kinds(tmp_path, key):
    """Adapter tensors fastlora cannot apply are refused (skipping them would load part of the adapter)."""
    expect(AdapterFormatError, write(tmp_path, good() | {key: torch.randn(2)}), key, "does not read", "OFT")


def test_lycoris_layers_missing_factors():
    expect(AdapterShapeError, {"m.hada_w1_a": torch.randn(6, 2)}, "hada_w1_b", "hada_w2_a")
    expect(AdapterShapeError, {"m.lokr_w1": torch.randn(2, 2)}, "lokr_w2")
    expect(AdapterFormatError, {"m.hada_w1_a": torch.randn(6, 2), "m.lokr_w1": torch.randn(2, 2)}, "mixes")


def test_pickle_refused_unless_allowed(tmp_path):
    torch.save(good(), tmp_path / "a.bin")
    expect(UnsafeFileError, tmp_path / "a.bin", "a.bin", "allow_pickle")
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "a.bin").read_bytes())
    expect(UnsafeFileError, tmp_path / "renamed.safetensors", "renamed.safetensors")
    assert sorted(load_adapter(tmp_path / "a.bin", allow_pickle=True).layers) == ["m", "n"]
    torch.save([torch.randn(2)], tmp_path / "list.pt")
    expect(AdapterFormatError, tmp_path / "list.pt", "list.pt", "dict", allow_pickle=True)


def test_pickle_refused_in_peft_directory(tmp_path):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"n": 2}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.save({"base_model.model." + k: v for k, v in good().items()}, tmp_path / "adapter_model.bin")
    expect(UnsafeFileError, tmp_path, "adapter_model.bin")
    assert load_adapter(tmp_path, allow_pickle=True).layers["n"].alpha == 8.0


def peft_dir(tmp_path, config):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    write(tmp_path, {"base_model.model." + k: v for k, v in good().items()}, name="adapter_model.safetensors")
    return tmp_path


@pytest.mark.parametrize("config, fragments", [
    ({"r": "4", "lora_alpha": 8}, ["'r'"]),
    ({"r": 4, "lora_alpha": True}, ["'lora_alpha'"]),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": {"n": 0}}, ["rank_pattern", "'n'"]),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": {"n": 2}, "alpha_pattern": {"(": 1}}, ["alpha_pattern", "'('"]),
    ({"r": 4, "lora_alpha": 8, "use_rslora": "yes"}, ["use_rslora"]),
    ({"r": 4, "lora_alpha": 8, "task_type": 3}, ["task_type"]),
    ({"peft_type": "IA3"}, ["IA3"]),
])
def test_bad_peft_config(tmp_path, config, fragments):
    expect(AdapterFormatError, peft_dir(tmp_path, config), "adapter_config.json", *fragments)


def test_config_rank_must_match_tensors(tmp_path):
    path = peft_dir(tmp_path, {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    expect(AdapterShapeError, path, "base_model.model.n.lora_A.weight", "r=4")


def test_unknown_config_keys_are_ignored(tmp_path):
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"n": 2}, "auto_mapping": {"x": "os.system"}, "extra": [1]}
    assert load_adapter(peft_dir(tmp_path, config)).layers["n"].scale == 4.0


@pytest.mark.parametrize("metadata, fragments", [
    ({"lora_adapter_metadata": "{not json"}, ["lora_adapter_metadata", "JSON"]),
    ({"lora_adapter_metadata": "[1, 2]"}, ["lora_adapter_metadata", "object"]),
    ({"lora_adapter_metadata": json.dumps({"transformer.r": -1})}, ["transformer", "'r'"]),
])
def test_bad_diffusers_metadata(tmp_path, metadata, fragments):
    expect(AdapterFormatError, write(tmp_path, good(), metadata), "a.safetensors", *fragments)


def test_bad_kohya_name_map(tmp_path):
    tensors = {"lora_m.lora_down.weight": torch.randn(2, 8), "lora_m.lora_up.weight": torch.randn(6, 2)}
    for names in ('{"lora_m": 3}', '{"lora_m": "other.module"}', '{"lora_x": "x"}'):
        expect(AdapterFormatError, write(tmp_path, tensors, {"fastlora_module_names": names}), "fastlora_module_names")
    assert "m" in load_adapter(write(tmp_path, tensors, {"fastlora_module_names": '{"lora_m": "m"}'})).layers


def test_malformed_layers():
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    expect(AdapterFormatError, {"m.lora_A.weight": a}, "'m'", "no up")
    expect(AdapterFormatError, {"m.lora_A.weight": a, "m.lora_up.weight": b}, "mix")
    expect(AdapterFormatError, {"m.lora_A.x.weight": a, "m.lora_B.y.weight": b}, "several adapters")
    expect(AdapterFormatError, {"m.lora_A.weight": a, "m.lora_A.default.weight": a, "m.lora_B.weight": b}, "both")
    expect(AdapterFormatError, {"m.lora_A.weight": a.int(), "m.lora_B.weight": b}, "m.lora_A.weight", "dtype")
    expect(AdapterFormatError, {"m.lora_A.weight": a, "m.lora_B.weight": b, "m.alpha": torch.ones(2)}, "m.alpha")
    expect(AdapterFormatError, {"m.alpha": torch.ones(())}, "alpha")
    expect(AdapterShapeError, {"m.lora_A.weight": a, "m.lora_B.weight": b, "m.lora_B.bias": torch.randn(5)},
           "m.lora_B.bias")


def test_dora_and_light_lora_shapes():
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    expect(AdapterShapeError, {"m.lora_down.weight": down, "m.lora_up.weight": up, "m.dora_scale": torch.ones(1, 8)},
           "m.dora_scale")
    expect(AdapterShapeError, {"m.lora_A.weight": down, "m.lora_B.weight": up,
                               "m.lora_magnitude_vector": torch.ones(5)}, "m.lora_magnitude_vector")
    expect(AdapterShapeError, {"m.lora_down.weight": down, "m.lora_mid.weight": torch.randn(2, 3),
                               "m.lora_up.weight": up}, "m.lora_mid.weight")
    tucker = {"m.lora_down.weight": torch.randn(2, 3, 3, 3), "m.lora_mid.weight": torch.randn(2, 2, 3, 3),
              "m.lora_up.weight": torch.randn(6, 2, 1, 1)}  # a Tucker core needs a 1x1 lora_down
    expect(AdapterShapeError, tucker, "m.lora_mid.weight", "Tucker core")


def test_a_bad_layer_fails_the_whole_load(tmp_path):
    tensors = good()
    tensors["n.lora_A.weight"][0, 0] = float("nan")  # "m" is fine, "n" is not
    path = write(tmp_path, tensors)
    expect(NonFiniteWeightError, path, "n.lora_A.weight")


def test_save_refusals(tmp_path):
    layers = {"m": AdapterLayer(torch.randn(2, 8), torch.randn(6, 2), 4.0, magnitude=torch.ones(6)),
              "n": AdapterLayer(torch.randn(2, 8), torch.randn(6, 2), 4.0)}
    with pytest.raises(AdapterFormatError, match="DoRA"):
        save_adapter(Adapter(layers, "kohya"), tmp_path / "p", "peft")
    with pytest.raises(ValueError, match="format"):
        save_adapter(Adapter(layers, "kohya"), tmp_path / "x.safetensors", "ckpt")
    clash = {"a.b": layers["n"], "a_b": layers["n"]}
    with pytest.raises(AdapterFormatError, match="lora_a_b"):
        save_adapter(Adapter(clash, "peft"), tmp_path / "k.safetensors", "kohya")
    assert not any(tmp_path.iterdir())
