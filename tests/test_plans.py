"""Launch plans (fastlora.choice.plans): a layer's steady-state call decides nothing again (no
backend choice, no argument checks, no implementation choice), and any change that could
change a decision makes the next call decide again."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from fastlora.choice import backend, dispatch
from fastlora.ops import checks
from fastlora import functional, reference
from fastlora.nn import LoraLinear
from data import generator, randn
from helpers import assert_close
from spies import count_calls


def make_layer(device, dtype=torch.float32):
    torch.manual_seed(0)
    layer = LoraLinear(48, 40, r=4, lora_alpha=8, dtype=dtype, device=device).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def expected(layer, x):
    return reference.lora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                 layer.lora_A.double(), layer.lora_B.double(), layer.scaling)


def deciders(monkeypatch):
    return count_calls(monkeypatch, (checks, "check_lora"), (backend, "choose"),
                       (dispatch.Chooser, "decide"))


def test_steady_state_call_decides_nothing(monkeypatch, device):
    layer = make_layer(device)
    x = randn(3, 5, 48, g=generator(0), device=device)
    with torch.no_grad():
        layer(x)
        counts = deciders(monkeypatch)
        for _ in range(2):
            y = layer(x)
    assert counts == {"check_lora": 0, "choose": 0, "decide": 0}, counts
    assert y.shape == (3, 5, 40)
    assert_close(y, expected(layer, x), torch.float32, "planned call")


def test_a_new_layout_or_switch_decides_again(monkeypatch, device):
    layer = make_layer(device)
    x = randn(6, 48, g=generator(1), device=device)
    with torch.no_grad():
        layer(x)
        counts = deciders(monkeypatch)
        layer(x[:, :].t().contiguous().t())  # the same values, column-major: new strides
        assert counts["check_lora"] == 1
        layer(randn(7, 48, g=generator(2), device=device))  # another row count
        assert counts["check_lora"] == 2
        monkeypatch.setenv("FASTLORA_BACKEND", "torch")  # a switch read per call
        y = layer(x)
        assert counts["choose"] > 2
    assert_close(y, expected(layer, x), torch.float32, "after the switch")


def test_changed_weights_are_checked_again(device):
    layer = make_layer(device)
    x = randn(4, 48, g=generator(3), device=device)
    with torch.no_grad():
        layer(x)
        layer.lora_A.mul_(2.0)  # in place: the plan holds no values
        assert_close(layer(x), expected(layer, x), torch.float32, "in-place update")
        layer.lora_A = nn.Parameter(randn(4, 47, g=generator(4), device=device))
        with pytest.raises(ValueError, match="lora_A must be"):
            layer(x)
        layer.lora_A = nn.Parameter(randn(4, 48, g=generator(5), device=device))
        assert_close(layer(x), expected(layer, x), torch.float32, "replaced parameter")


def _grads(layer, x, dy):
    """(y, dx, dA, dB) of ``layer(x)`` against dy."""
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_training_calls_are_planned(monkeypatch, dropout, device):
    """A call autograd records runs its plan (inside ``_Recorded``, the op layer's backward)
    and decides nothing after its first call, through optimizer steps (a plan reads no
    values); outputs and gradients equal the custom ops' (the same kernels and seed)."""
    layer = make_layer(device)
    layer.lora_dropout = dropout
    layer.train()
    g = generator(6)
    x = randn(2, 3, 48, g=g, device=device, requires_grad=True)
    dy = randn(2, 3, 40, g=g, device=device)
    torch.manual_seed(0)
    _grads(layer, x, dy)
    counts = deciders(monkeypatch)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.5)
    for step in range(2):
        torch.manual_seed(step)  # the dropout seed's draw
        got = _grads(layer, x, dy)
        assert counts == {"check_lora": 0, "choose": 0, "decide": 0}, (step, counts)
        torch.manual_seed(step)
        want_y = functional.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                        layer.scaling, dropout_p=dropout, training=True)
        want = (want_y,) + torch.autograd.grad(want_y, (x, layer.lora_A, layer.lora_B), dy)
        for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
            assert torch.equal(a, b), f"step {step}: {name}"
        opt.step()
        counts.update(check_lora=0, choose=0, decide=0)  # (the oracle's decisions)
    if dropout == 0.0:  # and the numbers are right
        with torch.no_grad():
            assert_close(layer(x), expected(layer, x), torch.float32, "after the steps")


# (x's dtype, the adapter's, dropout, x's shape, which of x, lora_A, lora_B need a gradient)
BACKWARD_CASES = [(torch.float32, torch.float32, 0.25, (2, 3, 37), (True, True, True)),
                  (torch.float16, torch.float32, 0.0, (5, 37), (False, True, True)),
                  (torch.float16, torch.float16, 0.25, (1, 3, 37), (True, False, True)),
                  (torch.float16, torch.float16, 0.0, (4, 37), (True, True, False))]


@pytest.mark.parametrize("dtype, adapter_dtype, dropout, shape, need", BACKWARD_CASES)
def test_a_planned_backward_runs_only_its_kept_launches(monkeypatch, dtype, adapter_dtype,
                                                         dropout, shape, need, device):
    """The first backward of a plan's layout keeps its launches (``plans._Grads``, holding
    none of that call's tensors); the next backward of that layout builds and decides
    nothing, launches only the kernels of the gradients autograd needs (dS and dB always,
    dA, dx) and runs no torch op but allocations and the casts to the inputs' dtypes; its
    gradients equal the custom op's bit for bit (the same kernels, configs, arguments and
    dropout seed)."""
    from bench_host import stubbed_launches

    from fastlora.choice import plans
    from spies import count_launches, torch_ops

    torch.manual_seed(0)
    layer = LoraLinear(37, 29, r=3, lora_alpha=5, adapter_dtype=adapter_dtype, dtype=dtype,
                       device=device).train()
    layer.lora_dropout = dropout
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.lora_A.requires_grad_(need[1])
    layer.lora_B.requires_grad_(need[2])
    g = generator(9)
    x = randn(*shape, g=g, device=device, dtype=dtype).requires_grad_(need[0])
    dy = randn(*shape[:-1], 29, g=g, device=device, dtype=dtype)

    def grads(x, y, dy=dy):
        inputs = [t for t, n in zip((x, layer.lora_A, layer.lora_B), need) if n]
        return (y,) + torch.autograd.grad(y, inputs, dy)

    torch.manual_seed(1)
    x0, dy0 = x.detach().clone().requires_grad_(need[0]), dy.clone()  # the same layouts
    grads(x0, layer(x0), dy0)  # the first call and backward: the plans are made
    first = weakref.ref(x0), weakref.ref(dy0)
    del x0, dy0
    assert [ref() for ref in first] == [None, None], "a plan holds a call's tensor"
    made = count_calls(monkeypatch, (plans, "_make_grads"), (dispatch.Chooser, "decide"))
    y = layer(x)
    with stubbed_launches(), torch_ops() as ops:
        grads(x, y)
    assert ops.ops <= {"aten::empty.memory_format", "aten::_to_copy", "aten::view"}, ops.ops
    launches = count_launches(monkeypatch)
    torch.manual_seed(2)
    y = layer(x)
    del launches[:]
    got = grads(x, y)
    assert made == {"_make_grads": 0, "decide": 0}, made
    assert launches == (["_lora_dy_kernel"] + ["_lora_da_kernel"] * need[1]
                        + ["_lora_linear_kernel"] * need[0]), launches
    torch.manual_seed(2)
    want = grads(x, functional.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                        layer.scaling, dropout_p=dropout, training=True))
    for name, a, b in zip(("y",) + tuple(n for n, k in zip(("dx", "dA", "dB"), need) if k),
                          got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("impl", ["cublas", "tma"])
def test_a_planned_backward_keeps_the_chosen_dx_implementation(monkeypatch, impl, device):
    """The dx pass runs what the chooser picks for the op's ``LORA_DX`` stage: a plan keeps
    a non-default implementation as the ``dispatch.Impl`` to call, and its gradients equal
    the custom op's bit for bit."""
    from fastlora.choice import plans

    monkeypatch.setenv("FASTLORA_IMPL", impl)
    layer = make_layer(device)
    layer.lora_dropout = 0.25
    layer.train()
    g = generator(10)
    x = randn(6, 48, g=g, device=device, requires_grad=True)
    dy = randn(6, 40, g=g, device=device)
    for step in range(2):
        torch.manual_seed(step)
        got = _grads(layer, x, dy)
        if step == 0:
            made = count_calls(monkeypatch, (plans, "_make_grads"))
    assert made == {"_make_grads": 0}, made
    (plan,) = [kept.value for kept in layer._plans._plans.values()]
    (kept,) = plan.backwards.values()
    assert kept.dx is dispatch.IMPLS[impl]
    torch.manual_seed(1)
    want_y = functional.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                    layer.scaling, dropout_p=0.25, training=True)
    want = (want_y,) + torch.autograd.grad(want_y, (x, layer.lora_A, layer.lora_B), dy)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert torch.equal(a, b), name


def test_a_frozen_adapter_gives_x_its_gradient(monkeypatch, device):
    layer = make_layer(device)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    g = generator(7)
    x = randn(4, 48, g=g, device=device, requires_grad=True)
    layer(x).sum().backward()
    x.grad = None
    counts = deciders(monkeypatch)
    layer(x).sum().backward()
    assert counts["check_lora"] == 0
    ref = x.detach().double().requires_grad_()
    reference.lora_linear(ref, layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                          layer.lora_B.double(), layer.scaling).sum().backward()
    assert_close(x.grad, ref.grad, torch.float32, "dx")


def test_a_trainable_base_runs_the_custom_ops(device):
    """A base weight that needs a gradient (unusual) is not planned: the custom ops give it."""
    layer = make_layer(device)
    layer.weight.requires_grad_(True)
    x = randn(4, 48, g=generator(8), device=device)
    layer(x).sum().backward()
    assert not layer._plans._plans
    want = torch.ones(4, 40, dtype=torch.float64).t() @ x.double()
    assert_close(layer.weight.grad, want, torch.float32, "dW")


def test_serve_decode_layer_is_two_launches_and_nothing_else(monkeypatch, device):
    """A served layer's decode call (fastlora.serve): the two launches (gathered shrink,
    fused linear), allocations and views, no memset, no check re-run; a write into the
    bank is seen, and a routing whose adapter was replaced is refused."""

    from bench_host import stubbed_launches

    from fastlora.adapters.bank import AdapterBank
    from fastlora.serve import attach, routed
    from spies import count_launches, torch_ops

    g = generator(7)
    model = nn.Sequential(nn.Linear(48, 40)).to(device)
    bank = AdapterBank(model, max_rank=4)
    adapters = {name: (randn(r, 48, g=g, device=device), randn(40, r, g=g, device=device), s)
                for name, r, s in (("a", 4, 0.5), ("b", 2, 2.0))}
    bank.add("a", *adapters["a"], layer="0")
    attach(model, bank)
    layer = model[0]
    x = randn(3, 48, g=g, device=device)

    def want(names):
        rows = []
        for i, name in enumerate(names):
            y = torch.nn.functional.linear(x[i].double(), layer.weight.double(), layer.bias.double())
            if name is not None:
                A, B, s = adapters[name]
                y = y + s * (x[i].double() @ A.double().t()) @ B.double().t()
            rows.append(y)
        return torch.stack(rows)

    routing = bank.index(["a", None, "a"])
    with torch.no_grad(), routed(routing):
        layer(x)
        counts = deciders(monkeypatch)
        with stubbed_launches(), torch_ops() as ops:  # the interpreter's own copies left out
            layer(x)
        launches = count_launches(monkeypatch)
        y = layer(x)
    assert launches == ["_lora_shrink_kernel", "_lora_linear_kernel"], launches
    assert ops.ops <= {"aten::view", "aten::t", "aten::empty.memory_format"}, ops.ops
    assert counts == {"check_lora": 0, "choose": 0, "decide": 0}, counts
    assert_close(y, want(["a", None, "a"]), torch.float32, "planned decode")
    bank.add("b", *adapters["b"], layer="0")  # a write into the bank: decided again
    with torch.no_grad(), routed(bank.index(["b", "a", None])):
        assert_close(layer(x), want(["b", "a", None]), torch.float32, "after a write")
    bank.add("a", *adapters["a"], layer="0", replace=True)
    with torch.no_grad(), routed(routing), pytest.raises(RuntimeError, match="replaced"):
        layer(x)
