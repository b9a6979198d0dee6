"""fastlora.dora_linear, dora_weight_norm and nn.DoraLinear against the reference (and PEFT).

Data from tests/data.py; tolerances relative to the term magnitudes (tests/tolerances.py):
with the norm held fixed (it is detached), DoRA's outputs and gradients are sums of
products, so the reference evaluated on absolute values bounds each one's rounding.
"""
import pytest
import torch

import fastlora
from data import generator, randn
from fastlora import functional, reference
from fastlora.nn import DoraLinear
from helpers import assert_close
from op_cases import (DORA_NAMES, SHAPES, check_dora, compare, dora_reference, make, upstream,
                      with_magnitude)
from tolerances import term_magnitudes


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_grads(shape, dtype, bias, device):
    check_dora(with_magnitude(make(*shape, dtype, bias=bias, device=device), 0.5), 0.5, dtype)


def test_trainable_base_weight(device):
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    check_dora([x, w.requires_grad_(), b, a, bb, m], 0.5, torch.float32)


def test_fp32_adapter_over_fp16_base(device):
    args = make(300, 130, 70, 16, torch.float16, adapter_dtype=torch.float32, device=device)
    check_dora(with_magnitude(args, 2.0), 2.0, torch.float16)


@pytest.mark.parametrize("r", [1, 8, 100])
def test_weight_norm_without_forming_ba(r, device):
    _, w, _, a, bb = make(37, 130, 70, r, torch.float32, device=device)
    got = fastlora.dora_weight_norm(w, a, bb, 1.7)
    assert got.dtype == torch.float32 and got.shape == (70,)
    ref = reference.dora_weight_norm(w.double(), a.detach().double(), bb.detach().double(), 1.7)
    assert_close(got, ref, torch.float32, "row norm")  # a norm adds no cancelling terms


@pytest.mark.parametrize("break_it, error, match", [
    (lambda a: a.__setitem__(1, a[1][:, :-1]), ValueError, r"lora_A must be \[r, 130\]"),
    (lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, r"lora_A must be \[r, 129\]"),
    (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, r"lora_B must be \[70, r\]"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), ValueError, "rank mismatch"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "weight must be"),
    (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "weight has dtype torch.int32"),
    (lambda a: a.__setitem__(1, a[1].detach().long()), TypeError, "lora_A has dtype"),
    (lambda a: a.__setitem__(2, a[2].detach().half()), TypeError, "same dtype"),
    (lambda a: a.__setitem__(1, a[1].detach().to("meta")), ValueError, "different devices"),
])
def test_weight_norm_checks_its_arguments(break_it, error, match, device):
    """A lora_A narrower than the weight would be read past its columns by the kernel."""
    _, w, _, a, bb = make(37, 130, 70, 8, torch.float32, device=device)
    args = [w, a, bb]
    break_it(args)
    with pytest.raises(error, match=match):
        fastlora.dora_weight_norm(*args, 1.0)
    with pytest.raises(TypeError, match="scaling"):
        fastlora.dora_weight_norm(w, a, bb, None)


def test_fan_in_fan_out_weight(device):
    """A Conv1D weight is stored [K, N]: passing its transpose (a view) must work."""
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    w_kn = w.t().contiguous()
    check_dora([x, w_kn.t(), b, a, bb, m], 0.5, torch.float32)


def test_eval_ignores_dropout_and_is_fused(device):
    args = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    plain = fastlora.dora_linear(*args[:5], 0.5, args[5])
    assert torch.equal(plain, fastlora.dora_linear(*args[:5], 0.5, args[5], dropout_p=0.3,
                                                   training=False))


def test_training_dropout_runs_reference_and_warns(monkeypatch, device):
    monkeypatch.setattr(functional, "_warned_dora_dropout", set())
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    gen = lambda: torch.Generator(device=device).manual_seed(4)  # noqa: E731
    with pytest.warns(UserWarning, match="not fused"):
        y = fastlora.dora_linear(x, w, b, a, bb, 0.5, m, dropout_p=0.3, training=True,
                                 generator=gen())
    y_ref = reference.dora_linear(x, w, b, a, bb, 0.5, m, dropout_p=0.3, training=True,
                                  generator=gen())
    assert torch.equal(y, y_ref)
    seeded = lambda s: fastlora.dora_linear(x, w, b, a, bb, 0.5, m, dropout_p=0.3,  # noqa: E731
                                            training=True, seed=s)
    assert torch.equal(seeded(9), seeded(9)) and not torch.equal(seeded(9), seeded(10))


def test_torch_compile_fullgraph(device):
    args = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    x, w, b, a, bb, m = args
    fn = lambda x: fastlora.dora_linear(x, w, b, a, bb, 0.5, m)  # noqa: E731
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(y, fn(x))  # no atomics in the forward
    dy = upstream(y, 0)
    y.backward(dy)
    compare(dora_reference(args, 0.5), args, y, dy, torch.float32, DORA_NAMES)


def test_bad_magnitude_raises(device):
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m[:-1])
    with pytest.raises(TypeError, match="magnitude"):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m.detach().long())
    with pytest.raises(ValueError, match="different devices"):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m.detach().to("meta"))


# ---------------------------------------------------------------- nn.DoraLinear

def dora_layer(device, seed, lora_alpha=16, trained=True) -> DoraLinear:
    """A DoraLinear over a seeded base; ``trained``: seeded non-zero lora_B and a magnitude
    away from the row norm, as after some training."""
    g = generator(seed)
    base = torch.nn.Linear(70, 48, device=device)
    with torch.no_grad():
        base.weight.copy_(randn(48, 70, g=g, device=device, scale=70 ** -0.5))
        base.bias.copy_(randn(48, g=g, device=device))
    layer = DoraLinear.from_linear(base, r=8, lora_alpha=lora_alpha)
    with torch.no_grad():
        layer.lora_A.copy_(randn(8, 70, g=g, device=device, scale=70 ** -0.5))
        if trained:
            layer.lora_B.copy_(randn(48, 8, g=g, device=device, scale=8 ** -0.5))
            layer.magnitude.mul_(1 + 0.2 * randn(48, g=g, device=device))
    return layer


def test_dora_module_matches_reference_and_new_layer_is_base(device):
    fresh = dora_layer(device, 0, trained=False)
    x = randn(2, 5, 70, g=generator(1), device=device, requires_grad=True)
    base = torch.nn.functional.linear(x, fresh.weight, fresh.bias)
    terms = term_magnitudes(lambda *t: torch.nn.functional.linear(*t), [x, fresh.weight, fresh.bias])[0]
    assert_close(fresh(x), base.double(), torch.float32, "fresh DoRA layer", terms)
    layer = dora_layer(device, 0)
    y = layer(x)
    dy = upstream(y, 0)
    y.backward(dy)
    args = [x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude]
    compare(dora_reference(args, layer.scaling), args, y, dy, torch.float32, DORA_NAMES)


def test_norm_cache_invalidated_by_optimizer_step(device):
    layer = dora_layer(device, 1)
    first = layer.weight_norm()
    assert layer.weight_norm() is first  # unchanged parameters: cached
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(randn(9, 70, g=generator(2), device=device)).square().sum().backward()
    opt.step()
    fresh = reference.dora_weight_norm(layer.weight.double(), layer.lora_A.detach().double(),
                                       layer.lora_B.detach().double(), layer.scaling)
    assert not torch.allclose(first.double(), fresh)
    assert_close(layer.weight_norm(), fresh, torch.float32, "norm after step")


def test_dora_merge_unmerge(device):
    layer = dora_layer(device, 2, lora_alpha=4).eval()
    x = randn(9, 70, g=generator(3), device=device)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert_close(layer(x), before.double(), torch.float32, "merged")
    layer.unmerge()
    assert_close(layer.weight, w0.double(), torch.float32, "unmerged weight")
    assert_close(layer(x), before.double(), torch.float32, "unmerged")


def test_matches_peft_dora_layer(device):
    peft = pytest.importorskip("peft")
    g = generator(3)
    model = torch.nn.Sequential(torch.nn.Linear(70, 48)).to(device)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["0"])
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(randn(48, 70, g=g, device=device, scale=70 ** -0.5))
        layer.base_layer.bias.copy_(randn(48, g=g, device=device))
        layer.lora_A["default"].weight.copy_(randn(8, 70, g=g, device=device, scale=70 ** -0.5))
        layer.lora_B["default"].weight.copy_(randn(48, 8, g=g, device=device))
        w = layer.base_layer.weight
        norm = reference.dora_weight_norm(w, layer.lora_A["default"].weight,
                                          layer.lora_B["default"].weight, layer.scaling["default"])
        layer.lora_magnitude_vector["default"].weight.copy_(1.2 * norm)
    x = randn(6, 70, g=g, device=device)
    y_peft = pm(x)
    y = fastlora.dora_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                             layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                             layer.scaling["default"], layer.lora_magnitude_vector["default"].weight)
    assert_close(y, y_peft.double(), torch.float32, "vs PEFT DoRA")
