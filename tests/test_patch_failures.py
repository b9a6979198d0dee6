"""Failures leave nothing behind: a patched forward that raises (in any of its paths,
adapter_names included) and a ``patch`` that raises leave the model as PEFT's, and the next
output equals PEFT's."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastlora.peft.classes  # noqa: E402
import fastlora.peft.forward  # noqa: E402
import fastlora.peft.mixed_batch  # noqa: E402
import fastlora.peft.patching  # noqa: E402
from fastlora.peft import is_patched, patch  # noqa: E402
from fastlora.peft.state import ATTR  # noqa: E402
from helpers import assert_close  # noqa: E402
from peft_models import VOCAB, add_adapter, ids, lora_config, lora_layers, peft_pair  # noqa: E402

NAMES = ["default", "b"]


class Injected(RuntimeError):
    pass


def fail_on_call(monkeypatch, module, name: str, n: int = 1):
    """``module.name`` raises ``Injected`` on its n-th call, works otherwise."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Injected(f"{name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def pair(device, **kw):
    model, ref = peft_pair("llama", device=device, **kw)
    add_adapter((model, ref), "b", lora_config(r=2))
    return model.eval(), ref.eval()


def assert_like_peft(model, ref, device, mixed: bool = True):
    """No PEFT hook left on a layer, and the next plain (and mixed) outputs equal PEFT's."""
    assert not [n for n, m in lora_layers(model).items() if m._forward_pre_hooks]
    x = ids(device)
    with torch.no_grad():
        assert_close(model(x).logits, ref(x).logits, what="next plain forward")
        if mixed:  # (PEFT refuses DoRA adapters in a mixed batch)
            assert_close(model(x, adapter_names=NAMES).logits,
                         ref(x, adapter_names=NAMES).logits, what="next mixed batch")


@pytest.mark.parametrize("path", ["single", "stacked", "first_fused", "dora"])
def test_failing_plain_forward(path, device, monkeypatch):
    model, ref = pair(device, use_dora=path == "dora")
    patch(model)
    if path in ("stacked", "first_fused"):
        for m in (model, ref):
            m.base_model.set_adapter(NAMES)
    if path == "first_fused":  # dropout on several adapters: the first fused, the others as PEFT
        for m in (model, ref):
            for layer in lora_layers(m).values():
                layer.lora_dropout["b"] = torch.nn.Dropout(0.5)
        ref.eval()
        model.train()
    op = "dora_linear" if path == "dora" else "lora_linear"
    fail_on_call(monkeypatch, fastlora.peft.forward, op, n=3)
    with pytest.raises(Injected):
        model(ids(device))
    model.eval()
    if path != "dora":
        for m in (model, ref):
            m.base_model.set_adapter("default")
    assert_like_peft(model, ref, device, mixed=path != "dora")


@pytest.mark.parametrize("training", [False, True])
def test_failing_mixed_batch(training, device, monkeypatch):
    model, ref = pair(device)
    patch(model)
    model.train(training)
    fail_on_call(monkeypatch, fastlora.peft.mixed_batch, "multi_lora_linear", n=3)
    with pytest.raises(Injected):
        model(ids(device), adapter_names=NAMES)
    assert model.base_model.training == training
    model.eval()
    assert_like_peft(model, ref, device)


def test_bad_request_does_not_poison_later_ones(device):
    """One failing adapter_names request (a token id out of range) on a server."""
    model, ref = pair(device)
    patch(model)
    bad = ids(device).clone()
    bad[0, 0] = VOCAB + 5
    with pytest.raises(IndexError):
        model(bad, adapter_names=NAMES)
    assert_like_peft(model, ref, device)


@pytest.mark.parametrize("where", ["reader", "swap"])
def test_failing_patch_changes_nothing(where, device, monkeypatch):
    model, ref = pair(device)
    if where == "reader":
        fail_on_call(monkeypatch, fastlora.peft.patching, "read_adapter", n=5)
    else:
        fail_on_call(monkeypatch, fastlora.peft.classes, "swap", n=4)
    with pytest.raises(Injected):
        patch(model)
    assert not any(is_patched(m) for m in model.modules())
    assert not [n for n, m in model.named_modules() if ATTR in vars(m)]
    assert_like_peft(model, ref, device)


def test_failing_repatch_changes_nothing(device, monkeypatch):
    """A second ``patch`` that would restore one layer (its base became unsupported) and
    patch another, and raises half way, leaves every class as it was."""
    model, ref = pair(device)
    patch(model)
    layers = lora_layers(model)
    odd = layers["base_model.model.model.layers.0.self_attn.o_proj"]
    odd.base_layer.register_forward_hook(lambda *args: None)  # now unsupported: patch restores it
    fastlora.peft.classes.restore(layers["base_model.model.model.layers.0.mlp.up_proj"])
    before = {n: type(m) for n, m in model.named_modules()}
    fail_on_call(monkeypatch, fastlora.peft.classes, "swap", n=1)
    with pytest.raises(Injected):
        patch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert is_patched(odd) and ATTR in vars(odd)
    odd.base_layer._forward_hooks.clear()
    assert_like_peft(model, ref, device)
