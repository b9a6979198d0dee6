"""The ops (lora_linear, dora_linear: forward and backward) under each FASTLORA_IMPL, against
the reference, with the op test files' checks; which implementation each linear stage ran;
and the keys the ops' calls produce, which fastlora.explain and fastlora.warmup rebuild
from shapes (dispatch.layer_stages)."""
import pytest
import torch

import fastlora
from data import generator, randn
from fastlora.choice import dispatch
from fastlora.choice.store import ChoiceCache
from fastlora.choice.dispatch import Chooser, Impl
from fastlora.kernels import dropout_mask
from op_cases import P, check_dora, check_lora, make, with_magnitude

# (M, K, N, r): rows of 16-byte multiples in fp16 and fp32 (every implementation), and odd
# ones (TMA cannot describe them)
ALIGNED = [(37, 72, 40, 8), (1, 48, 104, 1), (300, 136, 72, 100)]
ODD = [(37, 70, 48, 8), (300, 130, 70, 16)]
CASES = ([(impl, shape) for impl in ("fused", "cublas", "tma") for shape in ALIGNED]
         + [(impl, shape) for impl in ("fused", "cublas") for shape in ODD])


def _ids(case):
    impl, shape = case
    return f"{impl}-{'x'.join(map(str, shape))}"


class Recording(ChoiceCache):
    """A choice cache that lists the keys put into it."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def put(self, device, key, choice):
        self.keys.append(key)
        super().put(device, key, choice)


@pytest.fixture
def ran(monkeypatch):
    """The implementations that ran, in call order, through a fresh chooser."""
    names = []

    def counted(impl):
        def launch(*args, **kwargs):
            names.append(impl.name)
            return impl.launch(*args, **kwargs)
        return Impl(impl.name, launch, impl.unsupported)

    impls = {name: counted(impl) for name, impl in dispatch.IMPLS.items()}
    monkeypatch.setattr(dispatch, "CHOOSER", Chooser(impls, ChoiceCache()))
    return names


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_under_each_impl(case, dtype, ran, monkeypatch, device):
    impl, shape = case
    monkeypatch.setenv("FASTLORA_IMPL", impl)
    m, k = shape[:2]
    args = make(*shape, dtype, device=device)
    check_lora(args, 0.5, dtype, dropout_p=P, training=True, seed=3,
                           mask=dropout_mask(3, m, k, P, device=device))
    assert ran == [impl, impl]  # forward, dx
    check_lora(make(*shape, dtype, bias=False, device=device, seed=1), 2.0, dtype)
    assert ran == [impl] * 4


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_lora_fp32_adapter_3d_input(case, ran, monkeypatch, device):
    impl, (m, k, n, r) = case
    monkeypatch.setenv("FASTLORA_IMPL", impl)
    _, w, b, a, bb = make(m, k, n, r, torch.float16, adapter_dtype=torch.float32, device=device)
    x = randn(2, m, k, g=generator(1), device=device, dtype=torch.float16, requires_grad=True)
    check_lora([x, w, b, a, bb], 2.0, torch.float16)
    assert ran == [impl, impl]


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dora_under_each_impl(case, dtype, ran, monkeypatch, device):
    """DoRA's dx has no cuBLAS form: under FASTLORA_IMPL=cublas it runs its default."""
    impl, shape = case
    monkeypatch.setenv("FASTLORA_IMPL", impl)
    args = with_magnitude(make(*shape, dtype, device=device), 0.5)
    check_dora(args, 0.5, dtype)
    assert ran == [impl, "fused" if impl == "cublas" else impl]


@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
def test_forced_tma_refuses_rows_it_cannot_describe(shape, monkeypatch, device):
    monkeypatch.setenv("FASTLORA_IMPL", "tma")
    args = make(*shape, torch.float32, device=device)
    with pytest.raises(RuntimeError, match="FASTLORA_IMPL=tma cannot run this call: .*16-byte"):
        fastlora.lora_linear(*args, 0.5)


LAYERS = [  # (x shape, weight shape, rank, op kwargs)
    ((37, 72), (40, 72), 8, dict(dropout_p=0.1, training=True)),
    ((2, 19, 70), (48, 70), 16, dict(training=True)),
    ((5, 48), (104, 48), 1, dict(dora=True, training=True)),
    ((1, 130), (70, 130), 4, dict(dora=True)),
    ((300, 136), (72, 136), 100, dict()),
]


@pytest.mark.parametrize("x_shape, w_shape, rank, kw", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_op_keys_are_the_layer_stages(x_shape, w_shape, rank, kw, bias, monkeypatch, tmp_path,
                                      device):
    """The keys the ops' calls produce are those explain/warmup rebuild from the shapes, so
    explain reports what ran: here the injected fastest (cuBLAS where it is a candidate)."""
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    ms = {"fused": 2.0, "cublas": 1.0, "tma": 3.0}
    cache = Recording()
    chooser = Chooser(dispatch.IMPLS, cache, timer=lambda name, fn: ms[name])
    monkeypatch.setattr(dispatch, "CHOOSER", chooser)
    dora, training = kw.get("dora", False), kw.get("training", False)
    dropout_p = kw.get("dropout_p", 0.0)
    g = generator(0)
    x = randn(*x_shape, g=g, device=device, dtype=torch.float16, requires_grad=training)
    w = randn(*w_shape, g=g, device=device, dtype=torch.float16)
    b = randn(w_shape[0], g=g, device=device, dtype=torch.float16) if bias else None
    a = randn(rank, w_shape[1], g=g, device=device, requires_grad=training)
    bb = randn(w_shape[0], rank, g=g, device=device, requires_grad=training)
    op_kw = dict(dropout_p=dropout_p, training=training, seed=1)
    if dora:
        y = fastlora.dora_linear(x, w, b, a, bb, 0.5, w.float().norm(dim=1), **op_kw)
    else:
        y = fastlora.lora_linear(x, w, b, a, bb, 0.5, **op_kw)
    if training:
        y.backward(randn(*y.shape, g=g, device=device, dtype=y.dtype))
    explained = fastlora.explain(x_shape, w_shape, rank, dtype=torch.float16,
                                 adapter_dtype=torch.float32, bias=bias, dropout_p=dropout_p,
                                 dora=dora, training=training, device=device)
    assert cache.keys == [e.key for e in explained]
    stages = dispatch.layer_stages(x.numel() // x_shape[-1], w_shape[1], w_shape[0], rank,
                                   dtype=torch.float16, adapter_dtype=torch.float32, bias=bias,
                                   dropout=dropout_p > 0, dora=dora, training=training)
    assert [e.key for e in explained] == [spec.key() for spec in stages.values()]
    for e in explained:
        assert e.why == "measured"
        assert e.impl == ("fused" if e.stage == "dx" and dora else "cublas")
