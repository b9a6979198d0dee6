"""fastlora.adapters.bank.AdapterBank: loading (PEFT directories, state dicts, Adapter objects),
unloading and replacing adapters in place, packed memory, and the errors it raises."""
import copy

import pytest
import torch

import fastlora
from data import generator, rand, randn, randperm
from fastlora import multi_lora_linear, reference
from fastlora.adapters.bank import AdapterBank
from fastlora.io import Adapter, AdapterLayer
from helpers import assert_close

peft = pytest.importorskip("peft")


def seeded_(module, g, device):
    """Overwrite the module's parameters with seeded data (not the init's global RNG)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(*p.shape, g=g, device=device, scale=p.shape[-1] ** -0.5))
    return module


def base_model(device):
    model = torch.nn.Sequential(torch.nn.Linear(70, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 50)).to(device)
    return seeded_(model, generator(0), device)


def linear(device, k=70, n=48, seed=0):
    return seeded_(torch.nn.Linear(k, n, device=device), generator(seed), device)


def saved_peft_adapter(base, path, seed, **config):
    """Save a PEFT adapter with seeded random (non-zero) weights; return its PEFT model."""
    from peft import LoraConfig, get_peft_model

    g = generator(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    device = next(base.parameters()).device
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(randn(*p.shape, g=g, device=device, scale=p.shape[1] ** -0.5))
            if "lora_B" in name:
                p.copy_(randn(*p.shape, g=g, device=device, scale=0.2))
            if "magnitude" in name:
                p.mul_(1 + 0.2 * rand(*p.shape, g=g, device=device))
    model.save_pretrained(str(path))
    return model.eval()


def test_load_peft_dirs_state_dict_and_adapter_then_serve(tmp_path, device):
    base = base_model(device)
    lora = saved_peft_adapter(base, tmp_path / "lora", 1, r=8, lora_alpha=16,
                              target_modules=["0", "2"])
    dora = saved_peft_adapter(base, tmp_path / "dora", 2, r=4, lora_alpha=8,
                              target_modules=["0"], use_dora=True)
    bank = AdapterBank(base)
    assert bank.load("lora", tmp_path / "lora") == 0
    assert bank.load("dora", str(tmp_path / "dora")) == 1
    g = generator(3)
    A, B = randn(2, 70, g=g), randn(48, 2, g=g)  # adapter files load on the CPU
    bank.load("sd", {"base_model.model.0.lora_A.weight": A, "base_model.model.0.lora_B.weight": B})
    bank.load("obj", Adapter({"2": AdapterLayer(randn(3, 48, g=g), randn(50, 3, g=g), alpha=6.0)},
                             "peft"))
    assert bank.names == ["lora", "dora", "sd", "obj"]
    x = randn(12, 70, g=g, device=device)
    names = ["lora", "dora", None, "sd", "obj", "dora", "lora", "__base__", "sd", "obj", "dora", "lora"]
    layer = base[0]
    with torch.no_grad():
        y = multi_lora_linear(x, layer.weight, layer.bias, bank["0"], bank.index(names))
        want = {"lora": lora.base_model.model[0](x), "dora": dora.base_model.model[0](x),
                "sd": fastlora.lora_linear(x, layer.weight, layer.bias, A.to(device),
                                           B.to(device), 1.0),
                None: layer(x), "__base__": layer(x), "obj": layer(x)}  # obj: layer "2" only
    for i, a in enumerate(names):
        assert_close(y[i], want[a][i].double(), torch.float32, f"row {i} ({a})")
    assert bank["2"].ranks.tolist()[:4] == [8, 0, 0, 3]


def test_unload_and_replace_in_place(device):
    layer = linear(device)
    bank = AdapterBank(layer, capacity=4, rows=28, max_rank=16)  # full: reuse or repack
    g = generator(1)
    rnd = lambda *s: randn(*s, g=g, device=device)  # noqa: E731
    for i, r in enumerate([8, 4, 16]):
        bank.add(f"a{i}", rnd(r, 70), rnd(48, r), 1.0)
    storage = (bank[""].A.data_ptr(), bank[""].B.data_ptr(), bank[""].offsets.data_ptr())
    A_new, B_new = rnd(6, 70), rnd(48, 6)
    assert bank.add("a1", rnd(2, 70), rnd(48, 2), 1.0, replace=True) == 1  # smaller: in place
    bank.unload("a0")
    assert bank[""].used_rows == 2 + 16
    with pytest.raises(KeyError, match="unknown adapter 'a0'"):
        bank.index(["a0"])
    assert bank.add("new", A_new, B_new, 0.5) == 0  # the freed index and rows are reused
    assert (bank[""].A.data_ptr(), bank[""].B.data_ptr(), bank[""].offsets.data_ptr()) == storage
    x = rnd(5, 70)
    with torch.no_grad():
        y = multi_lora_linear(x, layer.weight, layer.bias, bank, bank.index(["new"] * 5))
        want = fastlora.lora_linear(x, layer.weight, layer.bias, A_new, B_new, 0.5)
    assert_close(y, want.double(), torch.float32, "replaced adapter")
    with pytest.raises(ValueError, match="already loaded"):
        bank.add("new", A_new, B_new, 0.5)


def test_hundreds_of_adapters_packed_by_real_rank(device):
    """200 adapters of ranks 1..8 (capacity grown from 4 slots, 0 rows): memory follows the
    real ranks, and a batch with a different adapter on every row is right."""
    layer = linear(device, 48, 64)
    bank = AdapterBank(layer, capacity=4)
    g = generator(2)
    ranks = [(1, 2, 4, 8)[i % 4] for i in range(200)]
    for i, r in enumerate(ranks):
        bank.add(f"t{i}", randn(r, 48, g=g, device=device, scale=0.2),
                 randn(64, r, g=g, device=device), 1.0)
    used = sum(ranks)  # 750 rows, where a stacked [n, R_max, K] layout pads to 1600
    assert bank.capacity == 256 and bank[""].used_rows == used <= bank[""].A.shape[0] <= 2 * used
    x = randn(200, 48, g=g, device=device)
    index = randperm(200, g=g, device=device)
    with torch.no_grad():
        y = multi_lora_linear(x, layer.weight, layer.bias, bank, index)
        ref = reference.multi_lora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                                bank.packed().map(torch.Tensor.double), index)
    assert_close(y, ref, torch.float32, "distinct adapter per row")


def test_bank_errors(device):
    model = base_model(device)
    bank = AdapterBank(model, max_rank=16)
    g = generator(5)
    A, B = randn(4, 70, g=g, device=device), randn(48, 4, g=g, device=device)
    with pytest.raises(ValueError, match=r"do not fit the base layer \[48, 70\]"):
        bank.add("x", A[:, :-1], B, 1.0, layer="0")
    with pytest.raises(ValueError, match="exceeds the bank's max_rank=16"):
        bank.add("x", randn(17, 70, g=g, device=device), randn(48, 17, g=g, device=device), 1.0,
                 layer="0")
    with pytest.raises(TypeError, match="not float"):
        bank.add("x", A.long(), B, 1.0, layer="0")
    with pytest.raises(ValueError, match="is on meta"):
        bank.add("x", A.to("meta"), B, 1.0, layer="0")
    with pytest.raises(ValueError, match="DoRA magnitude"):
        bank.add("x", A, B, 1.0, torch.ones(47, device=device), layer="0")
    with pytest.raises(KeyError, match="no module 'nope'"):
        bank.add("x", A, B, 1.0, layer="nope")
    with pytest.raises(ValueError, match="is a torch.nn.modules.activation.ReLU, not an nn.Linear"):
        bank.add("x", A, B, 1.0, layer="1")
    with pytest.raises(ValueError, match="invalid adapter name"):
        bank.add("__base__", A, B, 1.0, layer="0")
    with pytest.raises(ValueError, match="serves a model"):
        bank.packed()
    with pytest.raises(KeyError, match="unknown adapter 'x'"):
        bank.unload("x")
    assert len(bank) == 0  # nothing half-loaded
    with pytest.raises(TypeError, match="float dtype"):
        AdapterBank(model, dtype=torch.int8)
    single = AdapterBank(model[0])
    two_layers = Adapter({"0": AdapterLayer(A, B, 4.0),
                          "2": AdapterLayer(randn(4, 48, g=g), randn(50, 4, g=g), 4.0)}, "peft")
    with pytest.raises(ValueError, match="serves one layer"):
        single.load("two", two_layers)
    conv = Adapter({"c": AdapterLayer(randn(4, 3, 3, 3, g=g), randn(8, 4, g=g), 4.0)}, "peft")
    with pytest.raises(ValueError, match="convolution"):
        single.load("conv", conv)


class _Doubled(torch.nn.Linear):
    def forward(self, x):  # computes something else than nn.Linear's forward
        return 2 * super().forward(x)


def test_layers_are_recognized_by_class_and_forward():
    """A bitsandbytes Linear4bit (an nn.Linear subclass whose weight is packed 4-bit data,
    uint8 [ceil(N*K / 2), 1]) and an nn.Linear subclass with its own forward are not dense
    linear layers: the bank says so, naming the layer, instead of reading their weight; a
    model holding them is served on its other layers (float dtype by default), and
    attaching it leaves them their own forward."""
    bnb = pytest.importorskip("bitsandbytes")
    from fastlora.serve import attach, routed

    torch.manual_seed(0)
    q4 = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")
    q4.support_avx512bf16_for_cpu = False
    model = torch.nn.Sequential(q4, torch.nn.Linear(48, 40), _Doubled(40, 40)).to("cpu")
    assert model[0].weight.dtype == torch.uint8  # quantized on the move
    g = generator(9)
    with pytest.raises(ValueError, match=r"AdapterBank cannot serve this layer: it is a "
                                         r"bitsandbytes\.nn\.modules\.Linear4bit, a bitsandbytes "
                                         r"4-bit layer: an AdapterBank serves dense weights"):
        AdapterBank(model[0])
    bank = AdapterBank(model, max_rank=4)
    assert bank.dtype == torch.float32
    with pytest.raises(ValueError, match=r"module '0' is a bitsandbytes\.nn\.modules\.Linear4bit, "
                                         "a bitsandbytes 4-bit layer"):
        bank.add("a", randn(4, 64, g=g), randn(48, 4, g=g), 0.5, layer="0")
    with pytest.raises(ValueError, match=r"module '2' is a .*_Doubled, not an nn\.Linear"):
        bank.add("a", randn(4, 40, g=g), randn(40, 4, g=g), 0.5, layer="2")
    A, B = randn(4, 48, g=g), randn(40, 4, g=g)
    bank.add("a", A, B, 0.5, layer="1")
    x = randn(3, 64, g=g)
    with torch.no_grad():
        h = model[0](x)
        want = model[2](torch.nn.functional.linear(h, model[1].weight, model[1].bias)
                        + 0.5 * h @ A.t() @ B.t())
        assert attach(model, bank) == ["1"]
        with routed(bank.index(["a"] * 3)):
            got = model(x)
    assert_close(got, want.double(), torch.float32, "served model")
