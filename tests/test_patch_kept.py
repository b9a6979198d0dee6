"""A patched layer keeps what the PEFT reader decided (``reader.read_active``) from one call
to the next; every change a user makes to the PEFT layer in between is seen. Each test
calls the patched model first (the decision is kept), changes the patched model and an
unpatched copy alike, and checks that the next output equals PEFT's and that the fused op
runs exactly when it should."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from fastlora.peft import reader  # noqa: E402
from helpers import assert_close  # noqa: E402
from peft_models import two_adapter_layer  # noqa: E402
from spies import count_calls  # noqa: E402

FORWARD = sys.modules["fastlora.peft.forward"]


def make(device):
    """A PEFT model on one Linear(32 -> 40) with adapters "default" (r=4) and "b" (r=2),
    patched, and an unpatched copy (the oracle)."""
    return two_adapter_layer(device)


def layer_of(model):
    return model.base_model.model[0]


@pytest.fixture
def fused(monkeypatch):
    """How many times the patched forward called the fused op."""
    return count_calls(monkeypatch, (FORWARD, "lora_linear"))


def same_as_peft(model, ref, x, what, *, changed_from=None):
    """The patched output equals PEFT's; ``changed_from``: an output the change must alter
    (else the test could not fail)."""
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert_close(got, want.double(), torch.float32, what)
    if changed_from is not None:
        assert (want - changed_from).abs().max() > 1e-2 * want.abs().max(), f"{what}: no change"
    return want


def _perturbed(t: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return t.detach() * (1 + 0.3 * torch.randn(t.shape, generator=g).to(t.device, t.dtype))


def _new_rank(model) -> None:
    """lora_A / lora_B of "default" replaced through .data by rank-2 tensors (same dtype)."""
    layer = layer_of(model)
    g = torch.Generator().manual_seed(6)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A.data = torch.randn(2, 32, generator=g).to(A.device)
    B.data = torch.randn(40, 2, generator=g).to(B.device)


def _replace_parameter(model) -> None:
    mod = layer_of(model).lora_A["default"]
    mod.weight = nn.Parameter(_perturbed(mod.weight))


def _replace_module(model) -> None:
    layer = layer_of(model)
    old = layer.lora_B["default"]
    new = nn.Linear(old.in_features, old.out_features, bias=False).to(old.weight.device)
    with torch.no_grad():
        new.weight.copy_(_perturbed(old.weight))
    layer.lora_B["default"] = new


# (change, whether the fused op runs after it)
CHANGES = {
    "set_adapter": (lambda m: m.set_adapter("b"), True),
    "two active adapters": (lambda m: m.base_model.set_adapter(["default", "b"]), True),
    "set_scale": (lambda m: layer_of(m).set_scale("default", 0.25), True),
    "scale_layer": (lambda m: layer_of(m).scale_layer(3.0), True),
    "scaling dict": (lambda m: layer_of(m).scaling.__setitem__("default", -1.5), True),
    "in-place update": (lambda m: layer_of(m).lora_A["default"].weight.data.mul_(-2.0), True),
    "replaced parameter": (_replace_parameter, True),
    "replaced module": (_replace_module, True),
    "new rank through .data": (_new_rank, True),
    "delete the active adapter": (lambda m: (m.set_adapter("b"), m.delete_adapter("default")),
                                  True),
    "float64 (unsupported dtype)": (lambda m: m.double(), False),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changes_between_calls_are_seen(change, device, fused):
    model, ref = make(device)
    x = torch.randn(3, 32, device=device)
    before = same_as_peft(model, ref, x, "before")
    assert fused["lora_linear"] == 1
    apply, fuses = CHANGES[change]
    for m in (model, ref):
        apply(m)
    if change.startswith("float64"):  # the same values: the fused count tells
        same_as_peft(model, ref, x.double(), change)
    else:
        same_as_peft(model, ref, x, change, changed_from=before)
    assert fused["lora_linear"] == 1 + fuses, fused


def test_disable_adapter_context_between_calls(device, fused):
    model, ref = make(device)
    x = torch.randn(3, 32, device=device)
    before = same_as_peft(model, ref, x, "before")
    with model.disable_adapter(), ref.disable_adapter():
        same_as_peft(model, ref, x, "disabled", changed_from=before)
    assert fused["lora_linear"] == 1
    same_as_peft(model, ref, x, "enabled again")
    assert fused["lora_linear"] == 2


def test_merge_and_unmerge_between_calls(device, fused):
    model, ref = make(device)
    x = torch.randn(3, 32, device=device)
    same_as_peft(model, ref, x, "before")
    for m in (model, ref):
        m.base_model.merge_adapter()
    same_as_peft(model, ref, x, "merged")
    assert fused["lora_linear"] == 1
    for m in (model, ref):
        m.base_model.unmerge_adapter()
        m.set_adapter("b")
    same_as_peft(model, ref, x, "unmerged, adapter b")
    assert fused["lora_linear"] == 2


def test_dropout_module_is_read_per_call(device, fused):
    """p >= 1 on a new dropout module makes PEFT's forward run (its output in training:
    the base only); p and training mode are read on every call."""
    model, ref = make(device)
    x = torch.randn(3, 32, device=device)
    before = same_as_peft(model, ref, x, "before")
    for m in (model, ref):
        layer_of(m).lora_dropout["default"] = nn.Dropout(1.0)
        m.train()
    same_as_peft(model, ref, x, "dropout p=1", changed_from=before)
    assert fused["lora_linear"] == 1
    for m in (model, ref):
        layer_of(m).lora_dropout["default"].p = 0.0
    same_as_peft(model, ref, x, "dropout p=0")
    assert fused["lora_linear"] == 2


@pytest.mark.parametrize("where", ["base_layer", "lora_A"])
def test_a_hook_added_after_a_call_runs(where, device, fused):
    model, ref = make(device)
    x = torch.randn(3, 32, device=device)
    same_as_peft(model, ref, x, "before")
    layer = layer_of(model)
    module = layer.base_layer if where == "base_layer" else layer.lora_A["default"]
    seen = []
    handle = module.register_forward_hook(lambda *args: seen.append(1))
    same_as_peft(model, ref, x, "hooked")
    assert seen == [1] and fused["lora_linear"] == 1
    handle.remove()
    same_as_peft(model, ref, x, "hook removed")
    assert seen == [1] and fused["lora_linear"] == 2


def test_steady_state_reads_nothing_and_a_training_step_keeps_the_decision(monkeypatch,
                                                                          device):
    """The reader runs once per change of what it decided from, not per call: an
    optimizer step (in-place writes) keeps the decision, set_adapter does not."""
    model, ref = make(device)
    x = torch.randn(3, 32, device=device)
    model(x)
    reads = count_calls(monkeypatch, (reader, "read_base"), (reader, "read_adapter"))
    with torch.no_grad():
        model(x)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert reads == {"read_base": 0, "read_adapter": 0}, reads
    for m in (model, ref):
        m.set_adapter("b")
    model(x)
    assert reads == {"read_base": 1, "read_adapter": 1}, reads
