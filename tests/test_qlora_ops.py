"""``fastlora.lora_linear`` / ``dora_linear`` / ``dora_weight_norm`` over a bitsandbytes 4-bit
base weight (the fused kernels' QUANT4 path; the interpreter on CPU): outputs and every
gradient against the float64 reference on bitsandbytes' own dequantized weight, and the
checks that run before any launch."""
import copy
import dataclasses

import pytest
import torch

import fastlora
from data import generator, randn
from fastlora import reference
from fastlora.kernels import dropout_mask
from fastlora.ops.quant4 import Quant4Weight
from helpers import assert_close
from op_cases import compare, upstream

# (M, K, N, r), blocksize: odd N and K (blocks straddling rows), ranks 1..100
CASES = [((37, 70, 48, 8), 64), ((5, 130, 37, 1), 128), ((20, 128, 70, 100), 64),
         ((33, 256, 21, 16), 128)]
NAMES = ["x", "weight", "bias", "lora_A", "lora_B", "magnitude"]


@pytest.fixture
def bnbf():
    return pytest.importorskip("bitsandbytes.functional")


def case_id(case):
    (m, k, n, r), blocksize = case
    return f"{m}x{k}x{n}r{r}-b{blocksize}"


def make(bnbf, case, dtype, quant_type="nf4", nested=True, device="cpu", bias=True, seed=0):
    """x, the 4-bit view (compute dtype ``dtype``), bias, lora_A, lora_B with grads, and the
    weight bitsandbytes dequantizes to ``dtype`` (what the kernels multiply by)."""
    (m, k, n, r), blocksize = case
    g = generator(seed)
    w = randn(n, k, g=g, scale=k ** -0.5)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=nested)
    state.to(device)
    packed = packed.to(device)
    view = Quant4Weight.from_bnb(packed, state, compute_dtype=dtype)
    dense_state = copy.copy(state)
    dense_state.dtype = dtype
    dense = bnbf.dequantize_4bit(packed, dense_state)
    x = randn(m, k, g=g, device=device, dtype=dtype, requires_grad=True)
    b = randn(n, g=g, device=device, dtype=dtype, requires_grad=True) if bias else None
    lora_A = randn(r, k, g=g, device=device, dtype=dtype, scale=k ** -0.5, requires_grad=True)
    lora_B = randn(n, r, g=g, device=device, dtype=dtype, scale=r ** -0.5, requires_grad=True)
    return x, view, b, lora_A, lora_B, dense


def check_lora(x, view, b, lora_A, lora_B, dense, dtype, mask=None, **kw):
    y = fastlora.lora_linear(x, view, b, lora_A, lora_B, 0.5, **kw)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], view.shape[0])
    dy = upstream(y, 0)
    y.backward(dy)
    ref_kw = {k: v for k, v in kw.items() if k in ("dropout_p", "training")}
    compare(lambda *a: reference.lora_linear(*a, 0.5, dropout_mask=mask, **ref_kw),
            [x, dense, b, lora_A, lora_B], y, dy, dtype)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lora_output_and_grads(bnbf, case, dtype, quant_type, nested, device):
    args = make(bnbf, case, dtype, quant_type, nested, device, bias=case[0][3] != 1)
    check_lora(*args, dtype)


def test_lora_dropout_and_3d_input(bnbf, device):
    x, view, b, a, bb, dense = make(bnbf, CASES[0], torch.float32, device=device)
    mask = dropout_mask(99, x.shape[0], x.shape[1], 0.3, device=device)
    check_lora(x, view, b, a, bb, dense, torch.float32, mask=mask, dropout_p=0.3, training=True,
               seed=99)
    y3 = fastlora.lora_linear(x.detach().view(1, *x.shape), view, b, a, bb, 0.5)
    assert torch.equal(y3[0], fastlora.lora_linear(x.detach(), view, b, a, bb, 0.5))


def test_fp32_activations_over_fp16_compute_dtype(bnbf, device):
    """As bitsandbytes' Linear4bit: x's tiles cast to the compute dtype, the result in x's."""
    x, view, b, a, bb, dense = make(bnbf, CASES[0], torch.float16, device=device)
    x32 = x.detach().float().requires_grad_()
    y = fastlora.lora_linear(x32, view, b, a, bb, 0.5)
    assert y.dtype == torch.float32
    want = reference.lora_linear(x32.detach().half().double(), dense.double(), b.double(),
                                 a.double(), bb.double(), 0.5)
    assert_close(y, want, torch.float16, "fp32 x over an fp16 4-bit weight")


def test_params4bit_and_linear4bit(bnbf, device):
    """A bitsandbytes Params4bit is taken as is; its result is Linear4bit's plus the LoRA term."""
    import bitsandbytes as bnb

    g = generator(5)
    layer = bnb.nn.Linear4bit(70, 37, compute_dtype=torch.float32, quant_type="fp4")
    layer.load_state_dict({"weight": randn(37, 70, g=g, scale=70 ** -0.5), "bias": randn(37, g=g)})
    layer = layer.to(device)
    x = randn(2, 9, 70, g=g, device=device)
    a = randn(4, 70, g=g, device=device, scale=70 ** -0.5)
    bb = randn(37, 4, g=g, device=device)
    got = fastlora.lora_linear(x, layer.weight, layer.bias, a, bb, 2.0)
    want = layer(x) + 2.0 * (x @ a.t()) @ bb.t()
    assert_close(got, want, torch.float32, "Params4bit")


CHANGES = {
    "codes in place": lambda p: p.bitwise_xor_(0x11),
    "data assigned": lambda p: setattr(p, "data", p.data ^ 0x11),
    "absmax in place": lambda p: p.quant_state.absmax.add_(1),
    "nested absmax in place": lambda p: p.quant_state.state2.absmax.mul_(1.5),
}


@pytest.mark.parametrize("change", CHANGES)
def test_dora_norm_cache_follows_4bit_weight_changes(bnbf, change, device):
    """The DoRA norm cache over a Params4bit, given a fresh view per call (as a patched layer
    makes one per forward): kept while nothing changed, recomputed after a change of the
    packed codes or of any of their scales."""
    import bitsandbytes as bnb

    from fastlora.ops.cache import DoraNormCache

    g = generator(6)
    layer = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.load_state_dict({"weight": randn(40, 128, g=g, scale=128 ** -0.5)})
    p = layer.to(device).weight
    a = randn(4, 128, g=g, device=device, scale=128 ** -0.5)
    bb = randn(40, 4, g=g, device=device)
    cache = DoraNormCache()

    def norm(keep=True):
        view = Quant4Weight.from_bnb(p, compute_dtype=torch.float32)
        return cache.get("a", view, a, bb, 0.5, keep=keep)

    first = norm()
    assert norm() is first  # nothing changed: the kept value
    with torch.no_grad():
        CHANGES[change](p)
    fresh = norm(keep=False)
    assert not torch.equal(fresh, first)  # the change moved the norm
    assert torch.equal(norm(), fresh), change


def with_magnitude(view, dense, a, bb, seed=0):
    norm = reference.dora_weight_norm(dense.double(), a.detach().double(), bb.detach().double(), 0.5)
    noise = randn(*norm.shape, g=generator(seed), device=norm.device, dtype=torch.float64)
    return (norm * (1 + 0.2 * noise)).to(a.dtype).requires_grad_(), norm


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
def test_dora_output_grads_and_norm(bnbf, case, dtype, nested, device):
    x, view, b, a, bb, dense = make(bnbf, case, dtype, "fp4" if nested else "nf4", nested, device)
    magnitude, norm = with_magnitude(view, dense, a, bb)
    # the norm dequantizes W to fp32 (no rounding to the compute dtype): compare with bnb's fp32 W
    dense32 = reference.dequantize_4bit(view, torch.float32).double()
    norm32 = reference.dora_weight_norm(dense32, a.detach().double(), bb.detach().double(), 0.5)
    assert_close(fastlora.dora_weight_norm(view, a, bb, 0.5), norm32, dtype, "row norm")
    y = fastlora.dora_linear(x, view, b, a, bb, 0.5, magnitude, weight_norm=norm.to(dtype))
    dy = upstream(y, 0)
    y.backward(dy)
    compare(lambda *t: reference.dora_linear(*t[:5], 0.5, t[5], weight_norm=norm),
            [x, dense, b, a, bb, magnitude], y, dy, dtype, NAMES)


@pytest.mark.parametrize("break_it, error, match", [
    (lambda v: dict(x=v["x"][:, :-1]), ValueError, "x has 69 features but the 4-bit weight expects 70"),
    (lambda v: dict(x=v["x"].new_zeros(3, 48)), ValueError, "quantized from a .K, N. tensor"),
    (lambda v: {k: t.to("meta") for k, t in v.items() if k != "weight"}, ValueError, "the 4-bit weight is on cpu but x is on meta"),
    (lambda v: dict(bias=v["bias"][:-1]), ValueError, r"bias must have shape \(48,\)"),
    (lambda v: dict(lora_A=v["lora_A"][:, :-1]), ValueError, r"lora_A must be \[r, 70\]"),
])
def test_bad_input_raises_before_launch(bnbf, break_it, error, match):
    x, view, b, a, bb, _ = make(bnbf, CASES[0], torch.float32)
    args = dict(x=x.detach(), weight=view, bias=b.detach(), lora_A=a.detach(), lora_B=bb.detach())
    args.update(break_it(args))
    with pytest.raises(error, match=match):
        fastlora.lora_linear(args["x"], args["weight"], args["bias"], args["lora_A"],
                             args["lora_B"], 0.5)


def test_bad_quant_state_raises(bnbf):
    """A quant state that does not match the packed data, an unsupported blocksize or type."""
    x, view, b, a, bb, _ = make(bnbf, CASES[0], torch.float32)
    bad = [(dict(data=view.data[:-1]), "the quant state does not match"),
           (dict(quant_type="int4"), "unsupported 4-bit quant type 'int4'"),
           (dict(blocksize=48), "unsupported 4-bit blocksize 48")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            fastlora.lora_linear(x, dataclasses.replace(view, **change), b, a, bb, 0.5)


def test_multi_lora_refuses_a_4bit_weight(bnbf):
    _, view, *_ = make(bnbf, CASES[0], torch.float32)
    with pytest.raises(TypeError, match="multi_lora_linear takes a dense base weight"):
        fastlora.multi_lora_linear(torch.zeros(2, 70), view, None, None, torch.zeros(2))


def test_torch_compile_fullgraph(bnbf, device):
    """The 4-bit view and the ops trace without a graph break; same result as eager."""
    x, view, b, a, bb, _ = make(bnbf, CASES[0], torch.float32, device=device)
    fn = lambda t: fastlora.lora_linear(t, view, b, a, bb, 0.5)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), fn(x))
    compiled(x).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
