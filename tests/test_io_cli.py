"""The adapter-file command line: ``inspect``, ``convert``, ``resize`` through ``fastlora.io.cli.main``."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from fastlora.io import load_adapter
from fastlora.io.cli import main


def low_rank(out, inp, rank, true_rank, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out, true_rank, generator=g) @ torch.randn(true_rank, rank, generator=g)
    return torch.randn(rank, inp, generator=g), b


@pytest.fixture
def kohya_file(tmp_path):
    """Two kohya layers: rank 8 holding a rank-2 product (alpha 4), rank 6 holding rank 3 (alpha 12)."""
    tensors = {}
    for name, rank, true_rank, alpha in (("lora_unet_a_to_q", 8, 2, 4.0), ("lora_unet_a_to_k", 6, 3, 12.0)):
        a, b = low_rank(16, 12, rank, true_rank, seed=rank)
        tensors |= {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": torch.tensor(alpha)}
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "Dynamic"})
    return path


def test_inspect(kohya_file, capsys):
    assert main(["inspect", str(kohya_file)]) == 0
    out = capsys.readouterr().out
    assert "format:      kohya" in out and "layers:      2 (2 linear, 0 conv)" in out
    assert "dtypes:      float32" in out and "ranks:       6, 8" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("lora_unet")}
    assert rows["lora_unet_a_to_q"][1:5] == ["linear", "8", "4", "0.5"]
    assert rows["lora_unet_a_to_k"][1:5] == ["linear", "6", "12", "2"]


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_convert(kohya_file, tmp_path, fmt, capsys):
    out = tmp_path / ("converted" if fmt == "peft" else "converted.safetensors")
    assert main(["convert", str(kohya_file), str(out), "--to", fmt]) == 0
    assert "kohya -> " + fmt in capsys.readouterr().out
    before, after = load_adapter(kohya_file), load_adapter(out)
    assert after.source_format == fmt
    scales = {n: layer.scale for n, layer in before.layers.items()}
    assert {n: layer.scale for n, layer in after.layers.items()} == scales


def test_resize_dynamic(kohya_file, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(kohya_file), str(out), "--method", "sv_ratio", "--threshold", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "8 -> 2" in printed and "6 -> 3" in printed
    resized = load_adapter(out)
    assert resized.source_format == "kohya"
    assert {n: (layer.rank, layer.scale) for n, layer in resized.layers.items()} == \
        {"lora_unet_a_to_q": (2, 0.5), "lora_unet_a_to_k": (3, 2.0)}


def test_resize_fixed_with_cap_and_format(kohya_file, tmp_path):
    assert main(["resize", str(kohya_file), str(tmp_path / "p"), "--rank", "5", "--max-rank", "4", "--to", "peft"]) == 0
    resized = load_adapter(tmp_path / "p")
    assert {layer.rank for layer in resized.layers.values()} == {4}
    assert resized.layers["lora_unet_a_to_k"].alpha == 8.0 and math.isclose(resized.layers["lora_unet_a_to_k"].scale, 2)


def test_errors_return_one_with_the_reason(kohya_file, tmp_path, capsys):
    torch.save({"m.lora_A.weight": torch.randn(2, 4), "m.lora_B.weight": torch.randn(3, 2)}, tmp_path / "w.bin")
    assert main(["inspect", str(tmp_path / "w.bin")]) == 1
    assert "w.bin" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "w.bin"), "--allow-pickle"]) == 0
    kohya_file.write_bytes(kohya_file.read_bytes()[:-8])
    assert main(["convert", str(kohya_file), str(tmp_path / "x.safetensors"), "--to", "kohya"]) == 1
    assert "style.safetensors" in capsys.readouterr().err
    assert main(["resize", str(tmp_path / "w.bin"), str(tmp_path / "y"), "--allow-pickle"]) == 1  # no --rank
    assert "rank" in capsys.readouterr().err


def test_usage_errors_return_two(capsys):
    assert main(["frobnicate"]) == 2
    assert main(["convert", "a", "b"]) == 2  # --to is required
    assert main(["inspect", "--help"]) == 0
    assert "usage" in capsys.readouterr().out


def test_python_dash_m_fastlora_dispatches_here(kohya_file, capsys):
    entry = pytest.importorskip("fastlora.__main__")
    assert entry.main(["inspect", str(kohya_file)]) == 0
    assert "format:      kohya" in capsys.readouterr().out
