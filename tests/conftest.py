"""Test setup: the Triton kernels run in the CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported, hence at the top of this file.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="session")
def _choice_cache_dir(tmp_path_factory):
    """The implementation choices the tests measure (on a GPU) go to a scratch directory,
    never to the user's cache (fastlora.choice.store)."""
    os.environ["FASTLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("choices"))


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names
            item.add_marker(skip)


@pytest.fixture(params=["gather", "sorted"])
def multi_path(request, monkeypatch):
    """Runs a multi-adapter test on both row paths whatever its row count: "gather" (the
    decode path, rows in batch order) and "sorted" (rows grouped by adapter, segment
    tiles), by moving ``fastlora.kernels.multi_meta.GATHER_MAX_M``."""
    from fastlora.kernels import multi_meta

    monkeypatch.setattr(multi_meta, "GATHER_MAX_M", 1 << 30 if request.param == "gather" else 0)
    return request.param


@pytest.fixture
def fused_calls(monkeypatch):
    """Records every call the patched PEFT layers make to the fused op (the calls' arguments)."""
    import fastlora.peft.forward as forward

    calls = []
    real = forward.lora_linear

    def spy(x, weight, bias, lora_A, lora_B, scaling, **kw):
        calls.append(dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B,
                          scaling=scaling, **kw))
        return real(x, weight, bias, lora_A, lora_B, scaling, **kw)

    monkeypatch.setattr(forward, "lora_linear", spy)
    return calls


@pytest.fixture(params=["torch", "triton"])
def fast_backend(request, monkeypatch, device):
    """FASTLORA_BACKEND=torch, or the default path (Triton: GPU or CPU interpreter)."""
    from fastlora.choice import backend

    if request.param == "torch":
        monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    else:
        monkeypatch.delenv("FASTLORA_BACKEND", raising=False)
    assert backend.choose(torch.empty(1, device=device)) == request.param
    return request.param
