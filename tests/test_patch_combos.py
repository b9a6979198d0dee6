"""lora_bias, and DoRA adapters active together with other adapters, on the fused path:
outputs and every gradient (A, B, lora_B bias, DoRA magnitude, input) equal PEFT's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

from fastlora.peft import patch  # noqa: E402
from helpers import assert_close  # noqa: E402
from spies import count_calls  # noqa: E402
from peft_models import (PATCH_MODULE, assert_grads_close, ids, lora_config,  # noqa: E402
                         lora_grads, lora_layers, peft_pair)


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused calls the patched layers make (and PEFT fallbacks, as none)."""
    return count_calls(monkeypatch, (PATCH_MODULE, "lora_linear"), (PATCH_MODULE, "dora_linear"))


def config(r: int, alpha: float, **kw) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False, **kw)


def one_layer(device, adapters: dict[str, dict], base_bias: bool = True, fan_in_fan_out=False):
    """A PEFT model on Linear(33 -> 40) (or a transformers Conv1D) holding ``adapters``
    (name -> LoraConfig kwargs), all active in that order and trainable; every DoRA
    magnitude moved off its initial norm and every lora_B bias non-zero."""
    torch.manual_seed(0)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D
        net = nn.Sequential(Conv1D(40, 33))
    else:
        net = nn.Sequential(nn.Linear(33, 40, bias=base_bias))
    items = list(adapters.items())
    model = None
    for i, (name, kw) in enumerate(items):
        torch.manual_seed(10 + i)
        cfg = config(fan_in_fan_out=fan_in_fan_out, **kw)
        if model is None:
            model = get_peft_model(net, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    model.base_model.set_adapter([n for n, _ in items])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            elif "lora_B" in n and n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    model = model.to(device)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model, copy.deepcopy(model)


def check(model, ref, device, train: bool = True):
    """Output, dx and every LoRA gradient of the patched model against PEFT's."""
    model.train(train)
    ref.train(train)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 33, generator=g).to(device)
    dy = torch.randn(2, 5, 40, generator=g).to(device)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, exp = model(xs[0]), ref(xs[1])
    assert_close(out, exp, what="output")
    (out * dy).sum().backward()
    (exp * dy).sum().backward()
    assert_close(xs[0].grad, xs[1].grad, what="dx")
    assert_grads_close(model, ref)


def train_outputs(model, ref, device):
    """Both models' training-mode outputs from the same torch RNG state (PEFT's dropout
    modules draw from it)."""
    model.train()
    ref.train()
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(5)).to(device)
    outs = []
    for m in (model, ref):
        torch.manual_seed(1)
        outs.append(m(x))
    return outs


LORA_BIAS = dict(r=4, alpha=8, lora_bias=True)
PLAIN = dict(r=3, alpha=6)
DORA = dict(r=5, alpha=4, use_dora=True)
DORA2 = dict(r=2, alpha=3, use_dora=True)


@pytest.mark.parametrize("base_bias", [True, False])
def test_lora_bias_single_adapter(base_bias, device, calls):
    model, ref = one_layer(device, {"a": LORA_BIAS}, base_bias=base_bias)
    assert patch(model).all_patched
    check(model, ref, device)
    assert calls == {"lora_linear": 1, "dora_linear": 0}
    assert any(n.endswith("lora_B.a.bias") for n in lora_grads(model))


def test_lora_bias_stacked_with_another_adapter(device, calls):
    model, ref = one_layer(device, {"a": LORA_BIAS, "b": PLAIN, "c": LORA_BIAS})
    patch(model)
    check(model, ref, device)
    assert calls == {"lora_linear": 1, "dora_linear": 0}


def test_lora_bias_with_dropout_on_several_adapters(device, calls):
    """Independent masks per adapter: the first fused (its bias folded), the others PEFT's;
    the same torch RNG draws as PEFT for the others, so outputs compare exactly."""
    model, ref = one_layer(device, {"a": LORA_BIAS, "b": dict(lora_dropout=0.5, **LORA_BIAS)})
    patch(model)
    out, exp = train_outputs(model, ref, device)
    assert_close(out, exp, what="output")
    assert calls == {"lora_linear": 1, "dora_linear": 0}


ORDERS = {
    "dora_then_lora": {"d": DORA, "a": LORA_BIAS},
    "lora_then_dora": {"a": LORA_BIAS, "d": DORA},
    "lora_dora_lora_dora": {"a": LORA_BIAS, "d": DORA, "b": PLAIN, "e": DORA2},
    "two_dora": {"d": DORA, "e": DORA2},
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_dora_with_other_adapters(order, device, calls):
    model, ref = one_layer(device, ORDERS[order])
    report = patch(model)
    assert report.all_patched
    check(model, ref, device)
    assert calls == {"lora_linear": 0, "dora_linear": 1}
    assert sum("magnitude" in n for n in lora_grads(model)) == sum(
        "use_dora" in kw for kw in ORDERS[order].values())


def test_dora_with_other_adapters_conv1d_no_base_bias(device, calls):
    model, ref = one_layer(device, {"a": PLAIN, "d": DORA}, fan_in_fan_out=True)
    patch(model)
    check(model, ref, device)
    assert calls == {"lora_linear": 0, "dora_linear": 1}


def test_dora_with_dropout_beside_others_runs_peft(device, calls):
    """PEFT's DoRA forward with dropout in training does not rescale the running result
    (and masks are per adapter): PEFT's own forward runs, and in eval the fused one."""
    model, ref = one_layer(device, {"d": dict(lora_dropout=0.3, **DORA), "a": PLAIN})
    patch(model)
    out, exp = train_outputs(model, ref, device)
    assert_close(out, exp, what="train output")
    assert calls == {"lora_linear": 0, "dora_linear": 0}
    check(model, ref, device, train=False)
    assert calls == {"lora_linear": 0, "dora_linear": 1}


def test_llama_dora_and_lora_bias_adapters(device, calls):
    """End to end: a DoRA adapter and a lora_bias adapter active together on every layer."""
    model, ref = peft_pair("llama", device=device, use_dora=True)
    for m in (model, ref):
        torch.manual_seed(7)
        m.add_adapter("b", lora_config(r=2, lora_bias=True))
        m.base_model.set_adapter(["default", "b"])
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B.b.bias" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    patch(model)
    x = ids(device)
    out, exp = model(x, labels=x), ref(x, labels=x)
    assert calls["dora_linear"] == len(lora_layers(model)) and calls["lora_linear"] == 0
    assert_close(out.logits, exp.logits, what="logits")
    out.loss.backward()
    exp.loss.backward()
    assert_grads_close(model, ref)
