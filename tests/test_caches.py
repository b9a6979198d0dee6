"""Every cache fastlora keeps (patched PEFT DoRA norms, the packed adapters of adapter_names
batches, nn.DoraLinear's norm, AdapterBank's DoRA norms) against every way the weights it
came from change: the next output equals PEFT's (or the reference's) each time.

Each change is applied to the patched model and to an unpatched copy; the patched model has
used its caches before the change (a cache that missed the change gives an output off by a
large relative error: every change perturbs the weights by ~30%)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from fastlora import reference
from fastlora.adapters.bank import AdapterBank
from fastlora.nn import DoraLinear
from helpers import assert_close

peft = pytest.importorskip("peft")

from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from fastlora.peft.state import ATTR  # noqa: E402
from peft_models import two_adapter_layer  # noqa: E402

NAMES = ["default", "b", "__base__"]


def seeded_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)


def perturbed(t: torch.Tensor, seed: int) -> torch.Tensor:
    return (t.detach() * (1 + 0.3 * seeded_like(t, seed))).to(t.dtype)


def make_pair(device):
    """A PEFT model on one Linear(32 -> 40) with adapters "default" (DoRA) and "b" (LoRA),
    patched, and an unpatched copy (the oracle)."""
    return two_adapter_layer(device, dora=True, alpha_b=4)


def layer_of(model):
    return model.base_model.model[0]


def outputs(model, x, oracle: bool) -> list[torch.Tensor]:
    """DoRA "default" active, LoRA "b" active, and the mixed batch NAMES (for the unpatched
    oracle, PEFT refuses DoRA in a mixed batch: each row from its adapter's own run)."""
    outs = []
    for a in ("default", "b"):
        model.set_adapter(a)
        outs.append(model(x))
    model.set_adapter("default")
    if oracle:
        with model.disable_adapter():
            base = model(x)
        outs.append(torch.stack([outs[0][0], outs[1][1], base[2]]))
    else:
        outs.append(model(x, adapter_names=NAMES))
    return outs


def assert_same_as_peft(model, ref, x, what):
    with torch.no_grad():
        for got, want, path in zip(outputs(model, x, False), outputs(ref, x, True),
                                   ("DoRA", "LoRA", "mixed batch")):
            assert_close(got, want.double(), torch.float32, f"{what}: {path}")


def _optimizer_step(model, tmp_path):
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for i, p in enumerate(params):
        p.grad = seeded_like(p, 100 + i)
    torch.optim.SGD(params, lr=0.3).step()


def _load_state_dict(model, tmp_path):
    sd = model.state_dict()
    model.load_state_dict({k: perturbed(v, i) for i, (k, v) in enumerate(sd.items())})


def _set_peft_model_state_dict(model, tmp_path):
    sd = get_peft_model_state_dict(model, adapter_name="default")
    set_peft_model_state_dict(model, {k: perturbed(v, i) for i, (k, v) in enumerate(sd.items())},
                              adapter_name="default")


def _load_adapter(model, tmp_path):
    folder = tmp_path / "default"
    if not folder.exists():  # the same file for the patched model and the oracle
        other = copy.deepcopy(model)
        _set_peft_model_state_dict(other, tmp_path)
        other.save_pretrained(tmp_path, selected_adapters=["default"])
    model.load_adapter(tmp_path, adapter_name="default")


def _data_assignment(model, tmp_path):
    layer = layer_of(model)
    for i, p in enumerate((layer.base_layer.weight, layer.lora_A["default"].weight,
                           layer.lora_B["b"].weight)):
        p.data = perturbed(p, i)


def _replace_parameter(model, tmp_path):
    layer = layer_of(model)
    layer.lora_B["default"].weight = nn.Parameter(perturbed(layer.lora_B["default"].weight, 0))


def _delete_and_add_adapter(model, tmp_path):
    model.delete_adapter("b")
    torch.manual_seed(5)
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=4, target_modules=["0"],
                                      init_lora_weights=False, use_dora=True))


def _rescale(model, tmp_path):
    layer = layer_of(model)
    layer.scaling["default"] *= 3.0
    layer.scaling["b"] *= -2.0


CHANGES = {f.__name__[1:]: f for f in (_optimizer_step, _load_state_dict,
                                       _set_peft_model_state_dict, _load_adapter,
                                       _data_assignment, _replace_parameter,
                                       _delete_and_add_adapter, _rescale)}


@pytest.mark.parametrize("change", list(CHANGES))
def test_patched_caches_follow_weight_changes(change, device, tmp_path):
    model, ref = make_pair(device)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(device)
    assert_same_as_peft(model, ref, x, "before")
    state = layer_of(model).__dict__[ATTR]
    assert state.norms._entries and state.bank is not None, "the caches must be in use"
    for m in (model, ref):
        CHANGES[change](m, tmp_path)
    assert_same_as_peft(model, ref, x, f"after {change}")


def test_merge_unmerge_drops_the_layer_caches(device):
    """PEFT merges through ``weight.data +=``, invisible to version counters: the patched
    layer's merge / unmerge clear its state."""
    model, ref = make_pair(device)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(device)
    assert_same_as_peft(model, ref, x, "before")
    state = layer_of(model).__dict__[ATTR]
    for m in (model, ref):
        m.base_model.merge_adapter(["b"])
    assert not state.norms._entries and state.bank is None
    with torch.no_grad():
        assert_close(model(x), ref(x).double(), torch.float32, "merged")
    for m in (model, ref):
        m.base_model.unmerge_adapter()
    assert not state.norms._entries and state.bank is None
    assert_same_as_peft(model, ref, x, "after unmerge")


def test_data_copy_needs_refresh(device):
    """``p.data.copy_`` bypasses the version counter: ``fastlora.refresh(model)``."""
    model, ref = make_pair(device)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(device)
    assert_same_as_peft(model, ref, x, "before")
    for m in (model, ref):
        layer = layer_of(m)
        for i, p in enumerate((layer.base_layer.weight, layer.lora_B["default"].weight,
                               layer.lora_A["b"].weight)):
            p.data.copy_(perturbed(p, i))
    fastlora.refresh(model)
    assert_same_as_peft(model, ref, x, "after data.copy_ and refresh")


def test_inference_mode_then_training_step_patched_dora(device):
    """Lightning's pattern: validation under inference_mode, then a training step."""
    model, ref = make_pair(device)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        outputs(model, x, False)
    for m in (model, ref):
        m.train()
        m.set_adapter("default")
        m(x).square().sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert any("magnitude" in n for n in grads)
    for n, p in model.named_parameters():
        if n in grads:
            assert_close(p.grad, grads[n].double(), torch.float32, n)
    model(x, adapter_names=NAMES).sum().backward()  # a mixed batch trains too


# ------------------------------------------------------------------ nn.DoraLinear


def dora_layer(device):
    torch.manual_seed(1)
    layer = DoraLinear(70, 48, r=8, lora_alpha=16, device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(1.1)
    return layer


def dora_expected(layer, x):
    return reference.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                 layer.scaling, layer.magnitude)


@pytest.mark.parametrize("change", ["load_state_dict", "data_assignment", "data_copy_refresh"])
def test_dora_linear_norm_follows_weight_changes(change, device):
    layer = dora_layer(device)
    x = torch.randn(9, 70, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        layer(x)
        if change == "load_state_dict":
            layer.load_state_dict({k: perturbed(v, i) for i, (k, v)
                                   in enumerate(layer.state_dict().items())})
        elif change == "data_assignment":
            layer.weight.data = perturbed(layer.weight, 0)
            layer.lora_A.data = perturbed(layer.lora_A, 1)
        else:
            layer.weight.data.copy_(perturbed(layer.weight, 0))
            fastlora.refresh(layer)
        assert_close(layer(x), dora_expected(layer, x).double(), torch.float32, change)


def test_dora_linear_inference_mode_then_training_step(device):
    layer = dora_layer(device)
    x = torch.randn(9, 70, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.inference_mode():
        layer(x)
    layer.train()
    y = layer(x)
    y.square().sum().backward()
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    expected = torch.autograd.grad(dora_expected(layer, x).square().sum(), params)
    for p, g in zip(params, expected):
        assert_close(p.grad, g.double(), torch.float32, "gradient after inference_mode")


# ------------------------------------------------------------------ AdapterBank


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("change", ["in_place", "data_assignment", "data_copy_refresh"])
def test_adapter_bank_dora_norms_follow_the_base_weight(base_kind, change, device):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if base_kind == "linear":
        module = nn.Linear(70, 48).to(device)
    else:
        module = transformers.pytorch_utils.Conv1D(48, 70).to(device)
    bank = AdapterBank(module)
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 70, generator=g) * 0.1, torch.randn(48, 4, generator=g)
    m = torch.rand(48, generator=g) + 0.5
    bank.add("d", A, B, 2.0, m)
    x = torch.randn(6, 70, generator=g).to(device)

    def weight():
        return module.weight if base_kind == "linear" else module.weight.t()

    with torch.no_grad():
        fastlora.multi_lora_linear(x, weight(), module.bias, bank, bank.index(["d"] * 6))
        if change == "in_place":
            module.weight.mul_(1.5)
        elif change == "data_assignment":
            module.weight.data = perturbed(module.weight, 0)
        else:
            module.weight.data.copy_(perturbed(module.weight, 0))
            fastlora.refresh(bank)
        y = fastlora.multi_lora_linear(x, weight(), module.bias, bank, bank.index(["d"] * 6))
        want = fastlora.dora_linear(x, weight(), module.bias, A.to(device), B.to(device), 2.0,
                                    m.to(device))
    assert_close(y, want.double(), torch.float32, f"DoRA after {change}")
