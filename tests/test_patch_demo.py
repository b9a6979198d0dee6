"""``fastlora.demo.main``: the demo's checks pass on a tiny model and fail when they should."""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastlora import demo  # noqa: E402
import fastlora.peft.forward  # noqa: E402,F401

PATCH_MODULE = sys.modules["fastlora.peft.forward"]
TINY = ["--hidden", "32", "--layers", "1", "--vocab", "64", "--seq", "6", "--new-tokens", "2"]


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    # the demo may set these for its run; monkeypatch restores them afterwards
    for name in ("FASTLORA_BACKEND", "TRITON_INTERPRET"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.delenv("FASTLORA_BACKEND")


def test_demo_passes(capsys):
    assert demo.main(TINY) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "FAIL" not in out
    assert "7 of 7 LoRA layers patched" in out  # the PatchReport
    assert "generate 2 tokens: equal" in out
    if "cuda" not in out:
        assert "timing: skipped on a CPU" in out


def test_demo_reference_backend(capsys):
    assert demo.main(TINY + ["--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "FASTLORA_BACKEND=torch" in out and "backend.choose -> torch" in out


def test_demo_fails_on_wrong_numbers(monkeypatch, capsys):
    real = PATCH_MODULE.lora_linear

    def off_by_a_bit(*args, **kw):
        return real(*args, **kw) * 1.001

    monkeypatch.setattr(PATCH_MODULE, "lora_linear", off_by_a_bit)
    assert demo.main(TINY + ["--backend", "torch"]) == 1
    out = capsys.readouterr().out
    assert "verdict: FAIL" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_on_cuda_without_cuda_is_one_line(capsys):
    assert demo.main(TINY + ["--device", "cuda"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("fastlora demo: error: --device cuda:") and "--device cpu" in err


def test_demo_reports_a_missing_peft(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ModuleNotFoundError('peft')
    assert demo.main(TINY) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "fastlora demo: error: the demo needs peft: pip install 'fastlora[peft]'"


def test_demo_reports_the_real_import_error(monkeypatch, capsys):
    """peft installed but failing to import (as when a top-level package shadowed one of its
    dependencies) is that error, not 'needs peft'."""
    import types
    monkeypatch.setitem(sys.modules, "peft", types.ModuleType("peft"))
    assert demo.main(TINY) == 1
    out, err = capsys.readouterr()
    assert out == "" and "needs peft" not in err
    assert "importing peft / transformers failed: ImportError: cannot import name 'LoraConfig'" in err
