"""The op tests' cases and checks (``lora_linear``, ``dora_linear`` against the float64
reference), shared by their test modules: shapes, seeded inputs (tests/data.py), output
gradients, and comparisons within the tolerance of the term magnitudes (tests/tolerances.py)."""
from dataclasses import replace

import torch

import fastlora
from data import generator, randn
from fastlora import reference
from fastlora.adapters.packed import pack_adapters
from helpers import assert_close
from tolerances import term_magnitudes

P = 0.3  # the dropout probability of the dropout cases

SHAPES = [  # (M, K, N, r): odd sizes, ranks 1..100, tails in every dimension
    (1, 48, 70, 1),
    (37, 70, 48, 8),
    (300, 130, 70, 16),
    (37, 48, 130, 100),
]
NAMES = ["x", "weight", "bias", "lora_A", "lora_B"]


def make(m, k, n, r, dtype, adapter_dtype=None, bias=True, device="cpu", seed=0):
    """Signed random inputs with grads; LoRA B non-zero so every gradient is exercised."""
    g = generator(seed)
    adapter_dtype = adapter_dtype or dtype
    x = randn(m, k, g=g, device=device, dtype=dtype, requires_grad=True)
    weight = randn(n, k, g=g, device=device, dtype=dtype, scale=k ** -0.5)
    b = randn(n, g=g, device=device, dtype=dtype, requires_grad=True) if bias else None
    lora_A = randn(r, k, g=g, device=device, dtype=adapter_dtype, scale=k ** -0.5,
                   requires_grad=True)
    lora_B = randn(n, r, g=g, device=device, dtype=adapter_dtype, scale=r ** -0.5,
                   requires_grad=True)
    return x, weight, b, lora_A, lora_B


def upstream(y: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded output gradient for ``y``."""
    return randn(*y.shape, g=generator(10_000 + seed), device=y.device, dtype=y.dtype)


def reference_grads(fn, args, dy):
    """``fn`` (a reference op) and its gradients in float64 on the same values (zeros for
    an argument that requires grad but does not reach the output)."""
    args64 = [a.detach().double().requires_grad_(a.requires_grad) if a is not None else None
              for a in args]
    y = fn(*args64)
    y.backward(dy.double())
    return y, [grad_of(a) for a in args64]


def grad_of(t):
    if t is None or not t.requires_grad:
        return None
    return t.grad if t.grad is not None else torch.zeros_like(t)


def compare(fn, args, y, dy, dtype, names=NAMES):
    """``y`` and the gradients in ``args`` against the float64 reference ``fn``, within
    the tolerance of the term magnitudes; returns the output's term magnitudes."""
    y_ref, grads_ref = reference_grads(fn, args, dy)
    y_mag, grads_mag = term_magnitudes(fn, args, dy)
    assert_close(y, y_ref, dtype, "output", y_mag)
    for name, a, g_ref, g_mag in zip(names, args, grads_ref, grads_mag):
        if g_ref is not None:
            assert_close(grad_of(a), g_ref, dtype, f"grad {name}", g_mag)
    return y_mag


def check_lora(args, scaling, dtype, mask=None, dy_seed=0, **kw):
    """Output and every gradient (for the upstream gradient of ``dy_seed``) against the
    reference; ``mask`` is the dropout mask the kernels draw for ``kw``'s seed, replayed
    in the reference."""
    y = fastlora.lora_linear(*args, scaling, **kw)
    assert y.dtype == args[0].dtype
    dy = upstream(y, dy_seed)
    y.backward(dy)
    ref_kw = {k: v for k, v in kw.items() if k in ("dropout_p", "training")}
    compare(lambda *a: reference.lora_linear(*a, scaling, dropout_mask=mask, **ref_kw),
            args, y, dy, dtype)


DORA_NAMES = ["x", "weight", "bias", "lora_A", "lora_B", "magnitude"]


def with_magnitude(args, scaling, seed=0):
    """args + a magnitude near the row norm (so g is near 1, as after training)."""
    x, w, b, a, bb = args
    norm = reference.dora_weight_norm(w.double(), a.detach().double(), bb.detach().double(), scaling)
    noise = randn(*norm.shape, g=generator(seed), device=norm.device, dtype=torch.float64)
    return [x, w, b, a, bb, (norm * (1 + 0.2 * noise)).to(a.dtype).requires_grad_()]


def dora_reference(args, scaling, **kw):
    """The float64 reference as a function of the six tensors, with the row norm fixed at
    its value for ``args`` (as the op detaches it; also what makes the term magnitudes of
    ``term_magnitudes`` exact)."""
    _, w, _, a, bb, _ = args
    norm = reference.dora_weight_norm(w.detach().double(), a.detach().double(),
                                      bb.detach().double(), scaling)
    return lambda *t: reference.dora_linear(*t[:5], scaling, t[5], weight_norm=norm, **kw)


def check_dora(args, scaling, dtype, dy_seed=0, **kw):
    """dora_linear's output and every gradient (``args``: x, weight, bias, lora_A, lora_B,
    magnitude) against ``dora_reference``."""
    y = fastlora.dora_linear(*args[:5], scaling, args[5], **kw)
    assert y.dtype == args[0].dtype
    dy = upstream(y, dy_seed)
    y.backward(dy)
    compare(dora_reference(args, scaling), args, y, dy, dtype, DORA_NAMES)


K, N = 70, 48  # the multi-adapter cases' layer


def make_bank(ranks, dora, dtype=torch.float32, k=K, n=N, seed=0, device="cpu", dropout=None):
    """(x-independent) weight, bias and a bank of signed random adapters, leaves with grads."""
    g = generator(seed)
    weight = randn(n, k, g=g, device=device, dtype=dtype, scale=k ** -0.5)
    bias = randn(n, g=g, device=device, dtype=dtype)
    adapters = []
    for i, (r, d) in enumerate(zip(ranks, dora)):
        A = randn(r, k, g=g, device=device, dtype=dtype, scale=k ** -0.5)
        B = randn(n, r, g=g, device=device, dtype=dtype, scale=r ** -0.5)
        s = 0.5 + 0.25 * i
        m = None
        if d:
            norm = reference.dora_weight_norm(weight.double(), A.double(), B.double(), s)
            noise = randn(n, g=g, device=device, dtype=torch.float64)
            m = (norm * (1 + 0.2 * noise)).to(dtype)
        adapters.append((A, B, s, m))
    bank = pack_adapters(adapters, weight=weight, dropout=dropout)
    leaf = lambda t: t.detach().clone().requires_grad_() if t is not None else None  # noqa: E731
    return weight, bias, replace(bank, A=leaf(bank.A), B=leaf(bank.B), magnitude=leaf(bank.magnitude))
