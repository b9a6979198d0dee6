"""Tenant isolation in multi-adapter batches: every tenant's rows equal its own
single-adapter output (64+ adapters of mixed ranks, LoRA and DoRA, base rows), a routing
never reaches an adapter loaded after it was made, an empty slot is an error, a NaN adapter
spoils only its own rows; and the bank's input checks (index dtypes, scales, PEFT models)."""
import copy
import math
from dataclasses import replace

import pytest
import torch

from data import generator, randint, randn
from fastlora import multi_lora_linear, pack_adapters, reference
from fastlora.adapters.bank import AdapterBank
from fastlora.io import NonFiniteWeightError
from fastlora.adapters.routing import Routing
from helpers import assert_close

K, N = 40, 36
RANKS = (1, 4, 8, 16, 3, 2)


def linear(device, seed=40):
    g = generator(seed)
    layer = torch.nn.Linear(K, N, device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, g=g, device=device, scale=K ** -0.5))
    return layer


def tenant(i: int, layer, g):
    """Adapter of tenant i: rank RANKS[i % 6], DoRA when i % 5 == 2; CPU tensors."""
    r = RANKS[i % len(RANKS)]
    A, B = randn(r, K, g=g, scale=K ** -0.5), randn(N, r, g=g, scale=r ** -0.5)
    m = None
    if i % 5 == 2:
        norm = reference.dora_weight_norm(layer.weight.detach().cpu().double(), A.double(),
                                          B.double(), 0.5)
        m = (norm * (1 + 0.2 * randn(N, g=g, dtype=torch.float64))).float()
    return A, B, 0.5 + 0.01 * i, m


def single(x, layer, adapter):
    """The tenant's own output, float64 reference (base layer for None)."""
    w, b = layer.weight.double(), layer.bias.double()
    if adapter is None:
        return torch.nn.functional.linear(x.double(), w, b)
    A, B, s, m = (t.double().to(x.device) if isinstance(t, torch.Tensor) else t for t in adapter)
    if m is not None:
        return reference.dora_linear(x.double(), w, b, A, B, s, m)
    return reference.lora_linear(x.double(), w, b, A, B, s)


def check_tenants(y, x, layer, names, adapters, what):
    for name in set(names):
        rows = torch.tensor([a == name for a in names], device=x.device)
        want = single(x[rows], layer, adapters.get(name))
        assert_close(y[rows], want, torch.float32, f"{what}: tenant {name}")


def test_64_tenants_mixed_ranks_dora_and_base_rows_unload_reload(device):
    layer = linear(device)
    bank = AdapterBank(layer, capacity=16)  # grows to 128 slots
    g = generator(41)
    adapters = {f"t{i}": tenant(i, layer, g) for i in range(72)}
    for name, (A, B, s, m) in adapters.items():
        bank.add(name, A, B, s, m)
    pick = randint(0, 80, (120,), g=g).tolist()  # 72..79: base rows
    names = [f"t{i}" if i < 72 else None for i in pick]
    x = randn(120, K, g=g, device=device)
    routing = bank.index(names)
    with torch.no_grad():
        first = multi_lora_linear(x, layer.weight, layer.bias, bank, routing)
    check_tenants(first, x, layer, names, adapters, "step 1")

    # between steps: 12 tenants leave, 12 new ones take their slots (other ranks, DoRA mix)
    gone = sorted({a for a in names if a is not None})[:12]
    slots = {a: bank.slot(a) for a in gone}
    for a in gone:
        bank.unload(a)
        del adapters[a]
    for j, a in enumerate(gone):
        new = f"n{j}"
        adapters[new] = tenant(100 + j, layer, g)
        assert bank.add(new, *adapters[new]) in slots.values()  # freed slots are reused
    with pytest.raises(RuntimeError, match=rf"adapter '{gone[0]}' in slot {slots[gone[0]]}, which "
                                           rf"was unloaded .* now holds 'n\d+'"):
        multi_lora_linear(x, layer.weight, layer.bias, bank, routing)
    names2 = [f"n{gone.index(a)}" if a in gone else a for a in names]
    with torch.no_grad():
        second = multi_lora_linear(x, layer.weight, layer.bias, bank, bank.index(names2))
    check_tenants(second, x, layer, names2, adapters, "step 2")
    kept = torch.tensor([a not in gone for a in names], device=device)
    assert_close(second[kept], first[kept].double(), torch.float32, "tenants that stayed")


def test_replaced_adapter_refuses_older_routings(device):
    layer = linear(device)
    bank = AdapterBank(layer)
    g = generator(42)
    bank.add("a", *tenant(0, layer, g))
    bank.add("b", *tenant(1, layer, g))
    before = bank.index(["a", "b"])
    only_b = bank.index(["b", None])
    bank.add("a", *tenant(2, layer, g), replace=True)
    x = randn(2, K, g=g, device=device)
    with pytest.raises(RuntimeError, match="adapter 'a' in slot 0, which was replaced after the "
                                           "routing was made"):
        multi_lora_linear(x, layer.weight, layer.bias, bank, before)
    with torch.no_grad():  # a routing that does not use 'a' still holds
        multi_lora_linear(x, layer.weight, layer.bias, bank, only_b)


def test_empty_slots_are_errors_not_base_rows(device):
    layer = linear(device)
    bank = AdapterBank(layer, capacity=4)
    g = generator(43)
    for name in ("a", "b", "c"):
        bank.add(name, *tenant(ord(name), layer, g))
    bank.unload("b")
    x = randn(3, K, g=g, device=device)
    for index in (torch.tensor([0, 1, -1]), torch.tensor([3, 0, 0])):  # unloaded; never loaded
        if device == "cpu":
            with pytest.raises(ValueError, match=rf"holds {index.max()}, an empty slot"):
                multi_lora_linear(x, layer.weight, layer.bias, bank, index)
            with pytest.raises(ValueError, match="an empty slot"):
                Routing.from_index(index, bank.capacity, slots=bank.slots)
    with pytest.raises(KeyError, match="unknown adapter 'b'"):
        bank.index(["b"])


def test_nan_adapter_spoils_only_its_rows(multi_path, device):
    """A NaN in one adapter's B (or a DoRA magnitude) reaches its own rows only: in the
    forward (on the sorted path a tile's dot per segment must not add 0 * NaN to the other
    segments' rows) and in every gradient of the other rows and adapters."""
    layer = linear(device)
    g = generator(44)
    adapters = [tenant(i, layer, g) for i in range(4)]
    A, B, s, mag = adapters[1]
    adapters[1] = (A, torch.full_like(B, math.nan), s, mag)  # e.g. a diverged fine-tune
    adapters[2] = (adapters[2][0], adapters[2][1], 0.5, torch.full((N,), math.nan))  # DoRA
    bank = pack_adapters([tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in a)
                          for a in adapters], weight=layer.weight.detach())
    bank = replace(bank, A=bank.A.detach().requires_grad_(), B=bank.B.detach().requires_grad_())
    index = (torch.arange(40) % 5 - 1).to(device)
    x = randn(40, K, g=g, device=device, requires_grad=True)
    y = multi_lora_linear(x, layer.weight.detach(), layer.bias.detach(), bank, index)
    spoiled = torch.isnan(y).any(1)
    assert torch.equal(spoiled, (index == 1) | (index == 2)), spoiled.nonzero().flatten().tolist()
    y.backward(randn(*y.shape, g=g, device=device))
    assert torch.isfinite(x.grad[~spoiled]).all()
    for a in (0, 3):
        own = slice(bank.offsets[a].item(), bank.offsets[a].item() + bank.ranks[a].item())
        assert torch.isfinite(bank.A.grad[own]).all() and torch.isfinite(bank.B.grad[own]).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.int8, torch.int16])
def test_index_dtypes(dtype, device):
    layer = linear(device)
    bank = AdapterBank(layer)
    g = generator(45)
    bank.add("a", *tenant(0, layer, g))
    bank.add("b", *tenant(1, layer, g))
    x = randn(4, K, g=g, device=device)
    want = multi_lora_linear(x, layer.weight, layer.bias, bank,
                             torch.tensor([1, 0, 1, 1], device=device))
    got = multi_lora_linear(x, layer.weight, layer.bias, bank,
                            torch.tensor([1, 0, 1, 1], dtype=dtype, device=device))
    assert torch.equal(got, want)


def test_uint64_index_names_the_dtype_rule(device):
    layer = linear(device)
    bank = AdapterBank(layer)
    bank.add("a", *tenant(0, layer, generator(46)))
    with pytest.raises(TypeError, match="uint64.*signed integer dtype or uint8/uint16/uint32"):
        multi_lora_linear(randn(2, K, g=generator(47), device=device), layer.weight, layer.bias,
                          bank, torch.zeros(2, dtype=torch.uint64, device=device))


@pytest.mark.parametrize("bad, error, match", [
    (math.nan, NonFiniteWeightError, "adapter 'x': scale holds NaN or Inf"),
    (math.inf, NonFiniteWeightError, "scale holds NaN or Inf"),
    (1e39, ValueError, "scale 1e\\+39 is beyond float32's range"),
    (True, TypeError, "scale must be a real number, got bool"),
    ("2", TypeError, "scale must be a real number, got str"),
], ids=["nan", "inf", "beyond-fp32", "bool", "str"])
def test_bank_refuses_bad_scales(bad, error, match, device):
    layer = linear(device)
    bank = AdapterBank(layer)
    A, B, _, _ = tenant(0, layer, generator(48))
    with pytest.raises(error, match=match):
        bank.add("x", A, B, bad)
    assert len(bank) == 0


def test_bank_refuses_non_finite_tensors_like_io(device):
    layer = linear(device)
    bank = AdapterBank(torch.nn.Sequential(layer))
    A, B, _, _ = tenant(0, layer, generator(49))
    with pytest.raises(NonFiniteWeightError, match=r"adapter 'x' layer '0': B holds NaN or Inf"):
        bank.add("x", A, B.clone().index_fill_(0, torch.tensor([3]), math.inf), 1.0, layer="0")
    with pytest.raises(NonFiniteWeightError, match="magnitude holds NaN or Inf"):
        bank.add("x", A, B, 1.0, torch.full((N,), math.nan), layer="0")
    assert len(bank) == 0


def test_bank_of_a_peft_model(tmp_path, device):
    """AdapterBank(peft_model) binds adapters to the base layers of its LoRA layers."""
    peft = pytest.importorskip("peft")
    base = torch.nn.Sequential(linear(device), torch.nn.ReLU(), torch.nn.Linear(N, 20, device=device))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=["0", "2"]))
    g = generator(50)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(randn(*p.shape, g=g, device=device, scale=0.2))
    model.save_pretrained(str(tmp_path))
    bank = AdapterBank(model)
    bank.load("a", tmp_path)
    x = randn(3, K, g=g, device=device)
    lora_layer = model.base_model.model[0]
    base_layer = lora_layer.base_layer
    with torch.no_grad():
        got = multi_lora_linear(x, base_layer.weight, base_layer.bias, bank["0"], bank.index(["a"] * 3))
        want = lora_layer(x)
    assert_close(got, want.double(), torch.float32, "PEFT model bank")
    one = AdapterBank(lora_layer)  # a single LoRA layer: its base layer
    assert one[""].weight is base_layer.weight
