"""The adapter-file command line: ``inspect``, ``convert``, ``resize`` through ``fastlora.io.cli.main``."""
from __future__ import annotations

import argparse
import io
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from fastlora.io import load_adapter
from fastlora.io.cli import _parser, main


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


@pytest.fixture
def peft_keyed_file(tmp_path):
    """A single file with PEFT's keys (``base_model.model.``), as a PEFT adapter_model.safetensors."""
    a, b = low_rank(16, 12, 8, 2, seed=1)
    path = tmp_path / "in.safetensors"
    save_file({"base_model.model.fc.lora_A.weight": a, "base_model.model.fc.lora_B.weight": b}, str(path))
    return path


def run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of the command line."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *fragments) -> None:
    assert err.count("\n") == 1 and "error: " in err, err
    for fragment in fragments:
        assert str(fragment) in err, err


def test_inspect_summary_and_layers(kohya_file, capsys):
    code, out, _ = run(capsys, "inspect", kohya_file)
    assert code == 0
    assert "format:      kohya" in out and "layers:      2 (2 linear, 0 conv; 2 lora)" in out
    assert "base model:  Stable Diffusion 1.x/2.x (guessed from the layer names)" in out
    assert "dtypes:      float32" in out and "2.1 KiB on disk" in out or "KiB on disk" in out
    groups = [line.split() for line in out.splitlines() if line.startswith("lora ")]
    assert sorted(groups) == [["lora", "6", "12", "2", "float32", "1"], ["lora", "8", "4", "0.5", "float32", "1"]]
    assert "lora_unet_a_to_q" not in out
    code, out, _ = run(capsys, "inspect", kohya_file, "--layers")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("lora_unet")}
    assert rows["lora_unet_a_to_q"][1:6] == ["lora", "linear", "8", "4", "0.5"]
    assert rows["lora_unet_a_to_k"][1:6] == ["lora", "linear", "6", "12", "2"]


def test_inspect_json(kohya_file, capsys):
    code, out, _ = run(capsys, "inspect", kohya_file, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["file"] == str(kohya_file) and data["file_bytes"] == kohya_file.stat().st_size
    assert (data["format"], data["layers"], data["dtypes"]) == ("kohya", 2, ["float32"])
    assert data["parameters"] == 8 * 28 + 6 * 28 and data["tensor_bytes"] == 4 * data["parameters"]
    layer = data["layer_info"]["lora_unet_a_to_k"]
    assert (layer["rank"], layer["alpha"], layer["scale"], layer["shape"]) == (6, 12, 2.0, [16, 12])


@pytest.mark.parametrize("fmt", ["kohya", "lora"])
def test_convert(kohya_file, tmp_path, fmt, capsys):
    out = tmp_path / "converted.safetensors"
    code, printed, _ = run(capsys, "convert", kohya_file, out, "--to", fmt)
    assert code == 0 and "kohya -> kohya" in printed
    before, after = load_adapter(kohya_file), load_adapter(out)
    assert after.source_format == "kohya"
    assert {n: layer.scale for n, layer in after.layers.items()} == {n: layer.scale for n, layer in before.layers.items()}


@pytest.mark.parametrize("fmt, out", [("peft", "converted"), ("diffusers", "converted.safetensors")])
def test_convert_kohya_names_needs_a_base_model(kohya_file, tmp_path, fmt, out, capsys):
    code, _, err = run(capsys, "convert", kohya_file, tmp_path / out, "--to", fmt)
    assert code == 2
    one_line_error(err, "lora_unet_a_to_", "--base-model DIR")
    assert not (tmp_path / out).exists()


def test_convert_kohya_sd_file_to_peft_with_a_pipeline_directory(tmp_path, capsys):
    pytest.importorskip("diffusers")
    tiny = pytest.importorskip("tiny_models")
    tensors = tiny.kohya_sd_file(tmp_path / "sd.safetensors", tiny.tiny_unet(), tiny.tiny_clip())
    pipe = tiny.pipeline_dir(tmp_path / "pipe")
    code, out, err = run(capsys, "convert", tmp_path / "sd.safetensors", tmp_path / "peft", "--to", "peft",
                         "--base-model", pipe)
    assert code == 0, err
    assert {str(tmp_path / "peft" / c) for c in ("unet", "text_encoder")} == \
        set(out.split(" (peft)")[0].removeprefix("wrote ").split(", "))
    unet = load_adapter(tmp_path / "peft" / "unet")
    assert sorted(unet.layers) == sorted(tiny.UNET_TARGETS)
    text = load_adapter(tmp_path / "peft" / "text_encoder")
    assert sorted(text.layers) == sorted(tiny.TEXT_TARGETS)
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert torch.equal(unet.layers["down_blocks.1.resnets.0.conv1"].A, tensors[f"{name}.lora_down.weight"])
    code, out, _ = run(capsys, "inspect", tmp_path / "sd.safetensors", "--base-model", pipe, "--layers")
    assert code == 0 and "unet.down_blocks.1.resnets.0.conv1" in out and "conv" in out
    code, _, err = run(capsys, "inspect", tmp_path / "sd.safetensors", "--base-model", tmp_path / "peft")
    one_line_error(err, "not a transformers or diffusers model directory")


def test_resize_dynamic(kohya_file, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    code, printed, _ = run(capsys, "resize", kohya_file, out, "--method", "sv_ratio", "--threshold", "1000")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:4] for line in printed.splitlines() if line.startswith("lora_unet")}
    assert rows == {"lora_unet_a_to_q": ["lora", "8", "2"], "lora_unet_a_to_k": ["lora", "6", "3"]}
    resized = load_adapter(out)
    assert resized.source_format == "kohya"
    assert {n: (layer.rank, layer.scale) for n, layer in resized.layers.items()} == \
        {"lora_unet_a_to_q": (2, 0.5), "lora_unet_a_to_k": (3, 2.0)}


def test_resize_fixed_and_max_rank(kohya_file, tmp_path, capsys):
    assert run(capsys, "resize", kohya_file, tmp_path / "k.safetensors", "--rank", "5", "--quiet")[0] == 0
    resized = load_adapter(tmp_path / "k.safetensors")
    assert {layer.rank for layer in resized.layers.values()} == {5}
    assert resized.layers["lora_unet_a_to_k"].alpha == 10.0 and math.isclose(resized.layers["lora_unet_a_to_k"].scale, 2)
    code, _, _ = run(capsys, "resize", kohya_file, tmp_path / "m.safetensors", "--method", "sv_fro",
                     "--threshold", "1", "--max-rank", "2")
    assert code == 0 and {layer.rank for layer in load_adapter(tmp_path / "m.safetensors").layers.values()} == {2}


def test_output_path_means_a_file_or_a_directory(peft_keyed_file, tmp_path, capsys):
    """A ``.safetensors`` output is a file (PEFT keys in one file: the diffusers format);
    another path is a PEFT directory."""
    code, out, _ = run(capsys, "resize", peft_keyed_file, tmp_path / "out.safetensors", "--rank", "2")
    assert code == 0 and (tmp_path / "out.safetensors").is_file() and "(diffusers)" in out
    assert load_adapter(tmp_path / "out.safetensors").layers["fc"].rank == 2
    code, out, _ = run(capsys, "resize", peft_keyed_file, tmp_path / "outdir", "--rank", "2")
    assert code == 0 and (tmp_path / "outdir" / "adapter_config.json").is_file()
    code, _, err = run(capsys, "resize", peft_keyed_file, tmp_path / "x.safetensors", "--rank", "2", "--to", "peft")
    one_line_error(err, "--to peft writes a directory")
    code, _, err = run(capsys, "convert", peft_keyed_file, tmp_path / "outdir", "--to", "kohya", "--force")
    one_line_error(err, "is a directory")


def test_overwriting_needs_force(kohya_file, tmp_path, capsys):
    out = tmp_path / "k.safetensors"
    assert run(capsys, "convert", kohya_file, out, "--to", "kohya")[0] == 0
    code, _, err = run(capsys, "convert", kohya_file, out, "--to", "kohya")
    assert code == 2
    one_line_error(err, str(out), "already exists", "--force")
    assert run(capsys, "resize", kohya_file, out, "--rank", "2", "--force", "--quiet")[0] == 0
    assert {layer.rank for layer in load_adapter(out).layers.values()} == {2}


def test_errors_are_one_line_with_exit_code_two(kohya_file, tmp_path, capsys):
    code, _, err = run(capsys, "inspect", tmp_path / "missing.safetensors")
    assert code == 2
    one_line_error(err, "missing.safetensors: no such file or directory")
    torch.save({"m.lora_A.weight": torch.randn(2, 4), "m.lora_B.weight": torch.randn(3, 2)}, tmp_path / "w.bin")
    code, _, err = run(capsys, "inspect", tmp_path / "w.bin")
    one_line_error(err, "w.bin", "--allow-pickle")
    assert run(capsys, "inspect", tmp_path / "w.bin", "--allow-pickle")[0] == 0
    code, _, err = run(capsys, "resize", kohya_file, tmp_path / "y.safetensors")
    one_line_error(err, "pass --rank R", "--method")
    code, _, err = run(capsys, "resize", kohya_file, tmp_path / "y.safetensors", "--method", "sv_fro")
    one_line_error(err, "--threshold")
    code, _, err = run(capsys, "convert", kohya_file, tmp_path / "y.safetensors", "--to", "kohya", "--rank", "2")
    one_line_error(err, "LoRA layers only", "fastlora resize")
    kohya_file.write_bytes(kohya_file.read_bytes()[:-8])
    code, _, err = run(capsys, "convert", kohya_file, tmp_path / "x.safetensors", "--to", "kohya")
    assert code == 2
    one_line_error(err, "style.safetensors", "truncated")


@pytest.mark.parametrize("argv, fragment", [
    (["frobnicate"], "invalid choice"), (["convert", "a", "b"], "--to"), (["resize"], "required"),
    (["resize", "a", "b", "--rank", "x"], "invalid int value"),
])
def test_usage_errors_are_one_line(argv, fragment, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_line_error(err, fragment, "--help")


def test_help(capsys):
    assert run(capsys, "inspect", "--help")[1].startswith("usage: fastlora inspect")
    fastlora_main = pytest.importorskip("fastlora.__main__")
    assert fastlora_main.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: fastlora ")
    assert fastlora_main.main(["nope"]) == 2
    one_line_error(capsys.readouterr().err, "unknown command 'nope'")


def test_every_option_has_help():
    from fastlora.demo import _parser as demo_parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for parser in [demo_parser(), *commands.choices.values()]:
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help text"


def test_progress_bar_on_a_terminal_only(kohya_file, tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for quiet, shown in ((False, True), (True, False)):
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        flags = ["--quiet"] if quiet else []
        assert main(["resize", str(kohya_file), str(tmp_path / "p.safetensors"), "--rank", "2", "--force", *flags]) == 0
        assert ("resize: 100%" in terminal.getvalue() and "2/2" in terminal.getvalue()) == shown, terminal.getvalue()
    monkeypatch.undo()
    assert main(["resize", str(kohya_file), str(tmp_path / "p.safetensors"), "--rank", "2", "--force"]) == 0
    assert "100%" not in capsys.readouterr().err  # not a terminal: no bar


def test_python_dash_m_fastlora_dispatches_here(kohya_file, capsys):
    entry = pytest.importorskip("fastlora.__main__")
    assert entry.main(["inspect", str(kohya_file)]) == 0
    assert "format:      kohya" in capsys.readouterr().out


@pytest.mark.parametrize("library", ["transformers", "diffusers"])
def test_base_model_directory_of_one_model(tmp_path, library, capsys):
    """--base-model takes one model's directory too (only config.json is read)."""
    tiny = pytest.importorskip("tiny_models")
    if library == "transformers":
        transformers = pytest.importorskip("transformers")
        transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=32, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "model")
        module, shape = "model.layers.0.mlp.down_proj", (16, 32)
    else:
        pytest.importorskip("diffusers").UNet2DConditionModel(**tiny.UNET_CONFIG).save_config(tmp_path / "model")
        module, shape = "down_blocks.0.attentions.0.proj_in", (8, 8, 1, 1)
    name = "lora_" + module.replace(".", "_")
    g = torch.Generator().manual_seed(0)
    save_file({f"{name}.lora_down.weight": torch.randn(2, *shape[1:], generator=g),
               f"{name}.lora_up.weight": torch.randn(shape[0], 2, *shape[2:], generator=g)}, str(tmp_path / "k.safetensors"))
    code, out, err = run(capsys, "convert", tmp_path / "k.safetensors", tmp_path / "peft", "--to", "peft",
                         "--base-model", tmp_path / "model")
    assert code == 0, err
    assert list(load_adapter(tmp_path / "peft").layers) == [module]


def test_non_peft_formats_need_a_safetensors_path(kohya_file, tmp_path, capsys):
    """README: a ``.safetensors`` path is a file, any other path a PEFT directory."""
    code, _, err = run(capsys, "convert", kohya_file, tmp_path / "out", "--to", "kohya")
    assert code == 2 and not (tmp_path / "out").exists()
    one_line_error(err, "--to kohya writes one file", ".safetensors", "--to peft")


def test_a_closed_stdout_is_not_an_error(kohya_file):
    """``fastlora inspect FILE | head``: the reader is gone before anything is written."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "fastlora", "inspect", str(kohya_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err, err
