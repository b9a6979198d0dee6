"""fastlora.dora_linear, dora_weight_norm and nn.DoraLinear against the reference (and PEFT)."""
import pytest
import torch

import fastlora
from fastlora import functional, reference
from fastlora.nn import DoraLinear
from test_lora_linear import SHAPES, make
from tolerances import assert_close


def with_magnitude(args, scaling, seed=0):
    x, w, b, a, bb = args
    g = torch.Generator().manual_seed(seed)
    norm = reference.dora_weight_norm(w.double(), a.detach().double(), bb.detach().double(), scaling)
    m = (norm * (1 + 0.2 * torch.randn(norm.shape, generator=g, dtype=torch.float64)))
    return [x, w, b, a, bb, m.to(a.dtype).to(a.device).requires_grad_()]


def check(args, scaling, dtype, **kw):
    x, w, b, a, bb, m = args
    y = fastlora.dora_linear(x, w, b, a, bb, scaling, m, **kw)
    assert y.dtype == x.dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
           for t in args]
    y_ref = reference.dora_linear(*ref[:5], scaling, ref[5], **kw)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "output")
    for name, t, r in zip(["x", "weight", "bias", "lora_A", "lora_B", "magnitude"], args, ref):
        if t is not None and t.requires_grad:
            assert_close(t.grad, r.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_grads(shape, dtype, bias, device):
    check(with_magnitude(make(*shape, dtype, bias=bias, device=device), 0.5), 0.5, dtype)


def test_trainable_base_weight(device):
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    check([x, w.requires_grad_(), b, a, bb, m], 0.5, torch.float32)


def test_fp32_adapter_over_fp16_base(device):
    args = make(300, 130, 70, 16, torch.float16, adapter_dtype=torch.float32, device=device)
    check(with_magnitude(args, 2.0), 2.0, torch.float16)


@pytest.mark.parametrize("r", [1, 8, 100])
def test_weight_norm_without_forming_ba(r, device):
    _, w, _, a, bb = make(37, 130, 70, r, torch.float32, device=device)
    got = fastlora.dora_weight_norm(w, a, bb, 1.7)
    assert got.dtype == torch.float32 and got.shape == (70,)
    ref = reference.dora_weight_norm(w.double(), a.detach().double(), bb.detach().double(), 1.7)
    assert_close(got, ref, torch.float32, "row norm")


def test_fan_in_fan_out_weight(device):
    """A Conv1D weight is stored [K, N]: passing its transpose (a view) must work."""
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    w_kn = w.t().contiguous()
    check([x, w_kn.t(), b, a, bb, m], 0.5, torch.float32)


def test_eval_ignores_dropout_and_is_fused(device):
    args = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    plain = fastlora.dora_linear(*args[:5], 0.5, args[5])
    assert torch.equal(plain, fastlora.dora_linear(*args[:5], 0.5, args[5], dropout_p=0.3,
                                                   training=False))


def test_training_dropout_runs_reference_and_warns(monkeypatch, device):
    monkeypatch.setattr(functional, "_warned_dora_dropout", False)
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    with pytest.warns(UserWarning, match="not fused"):
        y = fastlora.dora_linear(x, w, b, a, bb, 0.5, m, dropout_p=0.3, training=True,
                                 generator=torch.Generator().manual_seed(4))
    y_ref = reference.dora_linear(x, w, b, a, bb, 0.5, m, dropout_p=0.3, training=True,
                                  generator=torch.Generator().manual_seed(4))
    assert torch.equal(y, y_ref)


def test_torch_compile_fullgraph(device):
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    fn = lambda x: fastlora.dora_linear(x, w, b, a, bb, 0.5, m)  # noqa: E731
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (x, a, bb, m)]
    for t in (x, a, bb, m):
        t.grad = None
    y_eager = fn(x)
    y_eager.square().sum().backward()
    assert torch.allclose(y, y_eager, atol=1e-6)
    for g, t in zip(got, (x, a, bb, m)):
        assert torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6)


def test_bad_magnitude_raises(device):
    x, w, b, a, bb, m = with_magnitude(make(37, 70, 48, 8, torch.float32, device=device), 0.5)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m[:-1])
    with pytest.raises(TypeError, match="magnitude"):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m.detach().long())
    with pytest.raises(ValueError, match="different devices"):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m.detach().to("meta"))


# ---------------------------------------------------------------- nn.DoraLinear

def trained(layer):
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(1.1)
    return layer


def test_dora_module_matches_reference_and_new_layer_is_base(device):
    torch.manual_seed(0)
    layer = DoraLinear(70, 48, r=8, lora_alpha=16, device=device)
    x = torch.randn(2, 5, 70, device=device)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert_close(layer(x), base.double(), torch.float32, "fresh DoRA layer")
    trained(layer)
    y = layer(x)
    y_ref = reference.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                  layer.scaling, layer.magnitude)
    assert_close(y, y_ref.double(), torch.float32, "trained DoRA layer")
    y.sum().backward()
    assert layer.magnitude.grad is not None and layer.lora_A.grad is not None


def test_norm_cache_invalidated_by_optimizer_step(device):
    torch.manual_seed(1)
    layer = trained(DoraLinear(70, 48, r=8, lora_alpha=16, device=device))
    first = layer.weight_norm()
    assert layer.weight_norm() is first  # unchanged parameters: cached
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(9, 70, device=device)).square().sum().backward()
    opt.step()
    fresh = reference.dora_weight_norm(layer.weight, layer.lora_A.detach(), layer.lora_B.detach(),
                                       layer.scaling)
    assert not torch.allclose(first, fresh)
    assert_close(layer.weight_norm(), fresh.double(), torch.float32, "norm after step")


def test_dora_merge_unmerge(device):
    torch.manual_seed(2)
    layer = trained(DoraLinear(70, 48, r=8, lora_alpha=4, device=device)).eval()
    x = torch.randn(9, 70, device=device)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert_close(layer(x), before.double(), torch.float32, "merged")
    layer.unmerge()
    assert torch.allclose(layer.weight, w0, atol=1e-5)
    assert_close(layer(x), before.double(), torch.float32, "unmerged")


def test_matches_peft_dora_layer(device):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(70, 48)).to(device)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["0"])
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    x = torch.randn(6, 70, device=device)
    y_peft = pm(x)
    y = fastlora.dora_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                             layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                             layer.scaling["default"], layer.lora_magnitude_vector["default"].weight)
    assert_close(y, y_peft.double(), torch.float32, "vs PEFT DoRA")
