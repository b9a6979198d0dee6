"""fastlora.patch on PEFT DoRA models: same numbers as PEFT, a norm cache that is never stale."""
import pytest
import torch

pytest.importorskip("peft")

from fastlora import functional, patch  # noqa: E402
from helpers import assert_close  # noqa: E402
from peft_models import (PATCH_MODULE, add_adapter, assert_grads_close, ids,  # noqa: E402
                         lora_config, lora_layers, peft_pair)


@pytest.fixture
def dora_calls(monkeypatch):
    """Records every fused DoRA call and every row-norm computation."""
    calls = {"dora": 0, "norm": 0}
    real_dora, real_norm = PATCH_MODULE.dora_linear, functional.dora_weight_norm

    def dora(*a, **kw):
        calls["dora"] += 1
        return real_dora(*a, **kw)

    def norm(*a, **kw):
        calls["norm"] += 1
        return real_norm(*a, **kw)

    monkeypatch.setattr(PATCH_MODULE, "dora_linear", dora)
    monkeypatch.setattr("fastlora.ops.cache.dora_weight_norm", norm)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_logits_and_grads_match_peft(arch, device, dora_calls):
    model, ref = peft_pair(arch, device=device, use_dora=True)
    report = patch(model)
    assert len(report.patched) == len(lora_layers(model)) and report.all_patched
    assert all("DoRA" in " ".join(e.notes) for e in report.layers)
    x = ids(device)
    out, out_ref = model(x, labels=x), ref(x, labels=x)
    assert_close(out.logits, out_ref.logits, what="logits")
    out.loss.backward()
    out_ref.loss.backward()
    assert_grads_close(model, ref)
    assert any("magnitude" in n for n, p in model.named_parameters() if p.grad is not None)
    assert dora_calls["dora"] == len(lora_layers(model))


def test_dora_training_matches_peft_step_for_step(device):
    model, ref = peft_pair("llama", device=device, use_dora=True)
    patch(model)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (model, ref)]
    x = ids(device)
    for step in range(20):
        losses = []
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            loss = m(x, labels=x).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5), f"step {step}"


def test_norm_cache_reused_and_invalidated(device, dora_calls):
    model, ref = peft_pair("llama", device=device, use_dora=True, target_modules=["q_proj"])
    patch(model)
    model.eval()
    ref.eval()
    x = ids(device)
    with torch.no_grad():
        assert_close(model(x).logits, ref(x).logits, what="first call")
        assert_close(model(x).logits, ref(x).logits, what="cached")
    assert dora_calls["norm"] == 1, "unchanged parameters: the norm comes from the cache"
    for m in (model, ref):  # an optimizer step changes A and B in place
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m(x, labels=x).loss.backward()
        opt.step()
    with torch.no_grad():
        assert_close(model(x).logits, ref(x).logits, what="after an optimizer step")
    assert dora_calls["norm"] == 2  # the backward pass reused it; the step invalidated it
    add_adapter((model, ref), "other", lora_config(use_dora=True, target_modules=["q_proj"]))
    for m in (model, ref):
        m.set_adapter("other")
    with torch.no_grad():
        assert_close(model(x).logits, ref(x).logits, what="after set_adapter")
        model.merge_adapter()
        ref.merge_adapter()
        assert_close(model(x).logits, ref(x).logits, what="merged")
        model.unmerge_adapter()
        ref.unmerge_adapter()
        assert_close(model(x).logits, ref(x).logits, what="unmerged")


def test_dora_beside_an_active_plain_adapter_is_fused(device, dora_calls):
    model, ref = peft_pair("llama", device=device, use_dora=True, target_modules=["q_proj"])
    add_adapter((model, ref), "plain", lora_config(target_modules=["q_proj"]))
    patch(model)
    for m in (model, ref):
        m.base_model.set_adapter(["default", "plain"])
    x = ids(device)
    assert_close(model(x).logits, ref(x).logits, what="DoRA + LoRA active")
    assert dora_calls["dora"] == 1
