"""Failures while writing adapters: ``save_adapter`` refuses NaN / Inf naming the layer, a
path below a regular file is named as such, and the command line reports every failure
(safetensors' own write errors, which are not OSErrors, and unexpected ones included) as
one line naming the user's path, with exit code 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from data import generator, randn
from fastlora.io import Adapter, AdapterLayer, load_adapter, save_adapter
from fastlora.io import files as io_files
from fastlora.io.cli import main
from fastlora.io.errors import NonFiniteWeightError


@pytest.fixture
def lora_file(tmp_path):
    g = generator(100)
    path = tmp_path / "in.safetensors"
    save_file({"base_model.model.fc.lora_A.weight": randn(2, 12, g=g),
               "base_model.model.fc.lora_B.weight": randn(16, 2, g=g)}, str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments) -> None:
    assert code == 2 and err.count("\n") == 1 and "error: " in err, (code, err)
    assert "Traceback" not in err and ".tmp" not in err, err
    for fragment in fragments:
        assert str(fragment) in err, err


@pytest.mark.parametrize("output", ["out.safetensors", "peft_dir", "deeper/out.safetensors"])
def test_an_output_below_a_regular_file(lora_file, tmp_path, output, capsys):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("not a directory")
    out = blocker / output
    code, _, err = run(capsys, "convert", lora_file, out, "--to", "lora")
    one_line_error(code, err, out, f"{blocker} is a file, not a directory")
    assert "File exists" not in err
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a file, not a directory"):
        save_adapter(load_adapter(lora_file), out, "peft" if output == "peft_dir" else "diffusers")


def test_a_safetensors_write_error_names_the_output(lora_file, tmp_path, monkeypatch, capsys):
    """As on a read-only directory or file system: safetensors raises its own error (not an
    OSError) naming its hidden temporary file."""
    def denied(tensors, filename, metadata=None):
        raise SafetensorError('Error while serializing: I/O error: Permission denied (os error 13) '
                              f'at path "{Path(filename).parent}/.tmpAbC123"')

    monkeypatch.setattr(io_files, "save_file", denied)
    out = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "convert", lora_file, out, "--to", "lora")
    one_line_error(code, err, f"{out}: Permission denied")
    code, _, err = run(capsys, "resize", lora_file, tmp_path / "dir", "--rank", "1")
    one_line_error(code, err, f"{tmp_path / 'dir' / 'adapter_model.safetensors'}: Permission denied")
    assert not list(tmp_path.glob("**/.*.tmp")) and not out.exists()

    def odd(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: header too large at path "{filename}"')

    monkeypatch.setattr(io_files, "save_file", odd)
    code, _, err = run(capsys, "convert", lora_file, out, "--to", "lora")
    one_line_error(code, err, f"{out}: cannot write it (Error while serializing: header too large)")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs, where no file can be created")
def test_an_unwritable_directory(lora_file, capsys):
    """sysfs refuses new files even to root (chmod does not stop root)."""
    out = Path("/sys/kernel/fastlora-test.safetensors")
    code, _, err = run(capsys, "convert", lora_file, out, "--to", "lora")
    one_line_error(code, err, out)
    assert not out.exists()


def test_unexpected_errors_are_one_line_too(lora_file, tmp_path, monkeypatch, capsys):
    from fastlora.io import cli

    def broken(*args, **kwargs):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr(cli, "resize", broken)
    code, _, err = run(capsys, "resize", lora_file, tmp_path / "o.safetensors", "--rank", "1")
    one_line_error(code, err, "RuntimeError: something broke over two lines")


@pytest.mark.parametrize("field, value", [("B", float("nan")), ("A", float("inf")),
                                          ("magnitude", float("nan")), ("bias", float("-inf"))])
def test_save_refuses_non_finite_tensors_naming_the_layer(tmp_path, field, value):
    g = generator(101)
    layer = AdapterLayer(randn(2, 8, g=g), randn(6, 2, g=g), 4.0, magnitude=torch.ones(6),
                         bias=torch.zeros(6))
    getattr(layer, field)[1] = value
    adapter = Adapter({"ok": AdapterLayer(randn(2, 8, g=g), randn(6, 2, g=g), 4.0,
                                          magnitude=torch.ones(6), bias=torch.zeros(6)),
                       "model.bad": layer}, "peft")
    for fmt, out in (("peft", tmp_path / "p"), ("kohya", tmp_path / "k.safetensors")):
        with pytest.raises(NonFiniteWeightError, match=rf"layer 'model.bad': {field} holds NaN or Inf"):
            save_adapter(adapter, out, fmt)
        assert not out.exists()


def test_save_refuses_a_non_finite_alpha(tmp_path):
    g = generator(102)
    adapter = Adapter({"m": AdapterLayer(randn(2, 8, g=g), randn(6, 2, g=g), float("nan"))}, "peft")
    with pytest.raises(NonFiniteWeightError, match=r"layer 'm': alpha holds NaN or Inf"):
        save_adapter(adapter, tmp_path / "p", "peft")
