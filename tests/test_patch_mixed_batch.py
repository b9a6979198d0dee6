"""fastlora.peft.peft_mixed_batch_forward on PEFT lora.Linear layers: PEFT's mixed batch
where PEFT supports it, per-adapter runs for DoRA and training."""
import pytest
import torch

from fastlora.peft import patch, peft_mixed_batch_forward
from fastlora.peft.state import state_of
from helpers import assert_close
from spies import count_calls

peft = pytest.importorskip("peft")

NAMES = ["a", "__base__", "b", "a", "d", "b", "a"]


def make_model(device, dropout=0.0, dtype=torch.float32):
    """Linear(70 -> 48) -> ReLU -> Linear(48 -> 50) with adapters a (r=8, both layers),
    b (r=1, first only), d (DoRA r=16, both); every B and magnitude non-trivial."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(70, 48), torch.nn.ReLU(), torch.nn.Linear(48, 50))
    model = get_peft_model(base.to(device, dtype), LoraConfig(
        r=8, lora_alpha=16, target_modules=["0", "2"], lora_dropout=dropout), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=1, lora_alpha=4, target_modules=["0"], lora_dropout=dropout))
    model.add_adapter("d", LoraConfig(r=16, lora_alpha=8, target_modules=["0", "2"], use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
            if "lora_" in name:
                p.requires_grad_(True)  # PEFT trains the active adapter only
    return model


def layer0(model):
    return model.base_model.model[0]


def per_adapter(layer, x, names):
    """Each sequence through PEFT's own forward with its adapter active (base for __base__)."""
    outs = []
    for i, a in enumerate(names):
        if a == "__base__":
            outs.append(layer.base_layer(x[i:i + 1]))
        else:
            layer._active_adapter = [a]  # not set_adapter(): it would freeze the others
            outs.append(layer(x[i:i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("shape", [(7, 70), (7, 5, 70)], ids=["2d", "3d"])
def test_matches_peft_mixed_batch(shape, device):
    model = make_model(device).eval()
    layer = layer0(model)
    x = torch.randn(*shape, device=device)
    names = [n if n != "d" else "a" for n in NAMES]  # PEFT's mixed batch refuses DoRA
    with torch.no_grad():
        got = peft_mixed_batch_forward(layer, x, names)
        want = layer._mixed_batch_forward(x, adapter_names=names)
    assert_close(got, want.double(), torch.float32, "vs PEFT mixed batch")


def test_dora_matches_per_adapter_runs(device):
    model = make_model(device).eval()
    for layer in (layer0(model), model.base_model.model[2]):  # the second lacks adapter b
        x = torch.randn(7, 5, layer.in_features, device=device)
        names = [n if n in layer.lora_A or n == "__base__" else "a" for n in NAMES]
        with torch.no_grad():
            got = peft_mixed_batch_forward(layer, x, names)
            want = per_adapter(layer, x, names)
        assert_close(got, want.double(), torch.float32, "DoRA mixed batch")


def test_training_gradients_match_per_adapter_runs(device):
    """Gradients reach each adapter in the batch (DoRA magnitude included), none other."""
    model = make_model(device).train()
    layer = layer0(model)
    names = ["a", "__base__", "d", "a", "d", "a", "a"]  # b is not in the batch
    x = torch.randn(7, 5, 70, device=device)
    dy = torch.randn(7, 5, 48, device=device)
    (peft_mixed_batch_forward(layer, x, names) * dy).sum().backward()
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    got = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert "lora_magnitude_vector.d.weight" in got and "lora_A.b.weight" not in got
    model.zero_grad()
    (per_adapter(layer, x, names) * dy).sum().backward()
    assert {n for n, p in params.items() if p.grad is not None} == set(got)
    for n, g in got.items():
        assert_close(g, params[n].grad.double(), torch.float32, n)


def test_training_dropout_is_applied(device):
    model = make_model(device, dropout=0.3).train()
    layer = layer0(model)
    x = torch.randn(7, 70, device=device)
    names = ["a", "b", "a", "__base__", "b", "b", "a"]
    with torch.no_grad():
        torch.manual_seed(1)
        first = peft_mixed_batch_forward(layer, x, names)
        torch.manual_seed(1)
        again = peft_mixed_batch_forward(layer, x, names)
        model.eval()
        plain = peft_mixed_batch_forward(layer, x, names)
    assert torch.equal(first, again)
    lora_rows = torch.tensor([n != "__base__" for n in names])
    assert not torch.allclose(first[lora_rows], plain[lora_rows])
    assert torch.equal(first[~lora_rows], plain[~lora_rows])


def test_cached_bank_is_never_stale(device):
    model = make_model(device).eval()
    layer = layer0(model)
    patch(model)  # the bank is kept in a patched layer's state
    x = torch.randn(7, 70, device=device)
    names = ["a", "b", "a", "__base__", "b", "a", "a"]
    with torch.no_grad():
        peft_mixed_batch_forward(layer, x, names)
        bank = state_of(layer).bank.value
        peft_mixed_batch_forward(layer, x, names)
        assert state_of(layer).bank.value is bank  # unchanged parameters: reused
        layer.lora_B["b"].weight.mul_(-2.0)  # an in-place update (as an optimizer step)
        got = peft_mixed_batch_forward(layer, x, names)
        assert state_of(layer).bank.value is not bank
        assert_close(got, layer._mixed_batch_forward(x, adapter_names=names).double(),
                     torch.float32, "after an in-place update")
        old = layer.lora_A["a"].weight
        new = torch.nn.Parameter(torch.randn_like(old))
        while new._version < old._version:  # a replaced parameter with an equal version counter
            new.add_(0.0)
        layer.lora_A["a"].weight = new
        got = peft_mixed_batch_forward(layer, x, names)
        assert_close(got, layer._mixed_batch_forward(x, adapter_names=names).double(),
                     torch.float32, "after a replaced parameter")


def test_names_checked_like_peft(device):
    model = make_model(device).eval()
    layer = layer0(model)
    x = torch.randn(3, 70, device=device)
    with torch.no_grad():
        with pytest.raises(ValueError, match="non-existing adapter.*nope"):
            peft_mixed_batch_forward(layer, x, ["a", "nope", "a"])
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            peft_mixed_batch_forward(layer, x, ["a", "a"])
        second = model.base_model.model[2]  # lacks b: base there when the model knows b
        x2 = torch.randn(3, 48, device=device)
        y = peft_mixed_batch_forward(second, x2, ["b", "a", "b"], known_adapters=["a", "b", "d"])
        want = second._mixed_batch_forward(x2, adapter_names=["b", "a", "b"])
        assert_close(y, want.double(), torch.float32, "adapter missing from the layer")
        assert not torch.allclose(y[1], second.base_layer(x2[1]))
        layer.merge(["a"])
        with pytest.raises(ValueError, match="merged"):
            peft_mixed_batch_forward(layer, x, ["a", "a", "a"])


def test_unsupported_adapter_falls_back_to_peft(device):
    from peft import LoraConfig

    model = make_model(device).eval()
    model.add_adapter("bias", LoraConfig(r=4, target_modules=["0"], lora_bias=True))
    layer = layer0(model)
    with torch.no_grad():
        layer.lora_B["bias"].weight.normal_()
        layer.lora_B["bias"].bias.normal_()
        x = torch.randn(4, 70, device=device)
        names = ["bias", "a", "__base__", "bias"]
        assert torch.equal(peft_mixed_batch_forward(layer, x, names),
                           layer._mixed_batch_forward(x, adapter_names=names))


def test_conv1d_base(device):
    """A transformers Conv1D base (weight [K, N], fan_in_fan_out): its transposed view."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(Conv1D(48, 70)).to(device), LoraConfig(
        r=4, target_modules=["0"], fan_in_fan_out=True), adapter_name="a")
    model.add_adapter("d", LoraConfig(r=8, target_modules=["0"], fan_in_fan_out=True, use_dora=True))
    layer = layer0(model).eval()
    patch(model)
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.weight.normal_(std=0.2)
        x = torch.randn(4, 3, 70, device=device)
        names = ["a", "__base__", "d", "a"]
        got = peft_mixed_batch_forward(layer, x, names)
        bank = state_of(layer).bank.value
        assert peft_mixed_batch_forward(layer, x, names) is not None
        assert state_of(layer).bank.value is bank  # the transposed view does not defeat the cache
        want = per_adapter(layer, x, names)
    assert_close(got, want.double(), torch.float32, "Conv1D base")


def test_one_routing_per_model_call(device, monkeypatch):
    """The patched tuner's adapter_names context makes the batch's routing once for the
    whole call (its rows grouped once per row count), not once per layer; each sequence
    gets its adapter's output (layer 2 lacks b: the base there, as PEFT)."""
    from fastlora.kernels import multi_meta
    from fastlora.peft import mixed_batch

    model = make_model(device).eval()
    patch(model)
    monkeypatch.setattr(multi_meta, "GATHER_MAX_M", 16)  # 35 rows: grouped, not gathered
    counts = count_calls(monkeypatch, (mixed_batch, "batch_routing"), (multi_meta, "group_rows"))
    g = torch.Generator().manual_seed(60)
    x = torch.randn(7, 5, 70, generator=g).to(device)
    with torch.no_grad():
        got = model(x, adapter_names=NAMES)
        assert counts == {"batch_routing": 1, "group_rows": 1}
        want = []
        for i, a in enumerate(NAMES):
            if a == "__base__":
                with model.disable_adapter():
                    want.append(model(x[i:i + 1]))
            else:
                model.base_model.set_adapter(a)
                want.append(model(x[i:i + 1]))
    assert_close(got, torch.cat(want).double(), torch.float32, "per-sequence adapters")
