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
