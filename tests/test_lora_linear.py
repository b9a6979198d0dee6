"""fastlora.lora_linear (Triton kernels; the interpreter on CPU) against the reference."""
import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.kernels import dropout_mask
from tolerances import assert_close

SHAPES = [  # (M, K, N, r): odd sizes, ranks 1..100, tails in every dimension
    (1, 48, 70, 1),
    (37, 70, 48, 8),
    (300, 130, 70, 16),
    (37, 48, 130, 100),
]


def make(m, k, n, r, dtype, adapter_dtype=None, bias=True, device="cpu", seed=0):
    """Signed random inputs with grads; LoRA B non-zero so every gradient is exercised."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt).requires_grad_()

    x = rnd(m, k)
    weight = rnd(n, k, scale=k ** -0.5).detach()
    b = rnd(n) if bias else None
    lora_A = rnd(r, k, dt=adapter_dtype, scale=k ** -0.5)
    lora_B = rnd(n, r, dt=adapter_dtype, scale=r ** -0.5)
    return x, weight, b, lora_A, lora_B


def reference_grads(args, dy, scaling, **kw):
    """Output and gradients of the reference in float64 on the same values."""
    args64 = [a.detach().double().requires_grad_(a.requires_grad) if a is not None else None
              for a in args]
    kw = {k: v for k, v in kw.items() if k != "seed"}
    y = reference.lora_linear(*args64, scaling, **kw)
    y.backward(dy.double())
    return y, [a.grad if a is not None and a.requires_grad else None for a in args64]


def check(args, scaling, dtype, mask=None, **kw):
    """Output and every gradient against the reference; ``mask`` is the dropout mask the
    kernels draw for ``kw``'s seed, replayed in the reference."""
    y = fastlora.lora_linear(*args, scaling, **kw)
    assert y.dtype == args[0].dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads_ref = reference_grads(args, dy, scaling, dropout_mask=mask, **kw)
    assert_close(y, y_ref, dtype, "output")
    for name, a, g_ref in zip(["x", "weight", "bias", "lora_A", "lora_B"], args, grads_ref):
        if g_ref is not None:
            assert_close(a.grad, g_ref, dtype, f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_grads(shape, dtype, bias, device):
    check(make(*shape, dtype, bias=bias, device=device), 0.5, dtype)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
def test_fp32_adapter_over_fp16_base(shape, device):
    """PEFT's default (autocast_adapter_dtype=True): fp32 A/B over fp16 x and W."""
    args = make(*shape, torch.float16, adapter_dtype=torch.float32, device=device)
    y = fastlora.lora_linear(*args, 2.0)
    assert y.dtype == torch.float16
    assert args[3].dtype == torch.float32
    check(make(*shape, torch.float16, adapter_dtype=torch.float32, device=device), 2.0,
          torch.float16)
    # the adapter gradients come back in the adapter's dtype
    assert args[3].grad is None or args[3].grad.dtype == torch.float32


def test_3d_noncontiguous_input(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    x3 = torch.randn(3, 70, 13, device=device).transpose(1, 2).requires_grad_()  # [3, 13, 70]
    assert not x3.is_contiguous()
    check([x3, w, b, a, bb], 1.5, torch.float32)


def test_expanded_output_gradient(device):
    """y.sum() sends back a stride-0 gradient: launchers must not assume contiguity."""
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    fastlora.lora_linear(x, w, b, a, bb, 0.5).sum().backward()
    _, grads = reference_grads([x, w, b, a, bb], torch.ones(37, 48), 0.5)
    assert_close(x.grad, grads[0], torch.float32, "grad x")
    assert_close(a.grad, grads[3], torch.float32, "grad lora_A")
    assert_close(bb.grad, grads[4], torch.float32, "grad lora_B")


def test_trainable_base_weight(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    check([x, w.requires_grad_(), b, a, bb], 0.5, torch.float32)


def test_empty_batch(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    y = fastlora.lora_linear(x[:0], w, b, a, bb, 0.5)
    assert y.shape == (0, 48)


# ---------------------------------------------------------------- dropout

P = 0.3


def test_dropout_matches_reference_with_same_mask(device):
    mask = dropout_mask(1234, 300, 130, P, device=device)
    check(make(300, 130, 70, 16, torch.float32, device=device), 0.7, torch.float32, mask=mask,
          dropout_p=P, training=True, seed=1234)


def test_dropout_deterministic_per_seed(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    run = lambda seed: fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=P, training=True, seed=seed)  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(0)
    first = fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=P, training=True)
    torch.manual_seed(0)
    assert torch.equal(first, fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=P, training=True))


def test_dropout_never_in_eval_and_p0_exact(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    plain = fastlora.lora_linear(x, w, b, a, bb, 1.0)
    assert torch.equal(plain, fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.5, training=False))
    assert torch.equal(plain, fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.0, training=True))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_rate_within_statistical_bounds(p, device):
    m, k = 240, 250
    keep = dropout_mask(99, m, k, p, device=device)
    n = m * k
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - keep.float().mean().item()) - p) < 5 * sigma
    # rows and columns are not correlated: each row's rate is plausible too
    row_rates = 1 - keep.float().mean(1)
    assert (row_rates - p).abs().max() < 6 * (p * (1 - p) / k) ** 0.5
    assert not torch.equal(keep, dropout_mask(100, m, k, p, device=device))


def test_dropout_under_checkpointing_recomputes_same_mask(device):
    from torch.utils.checkpoint import checkpoint

    args = make(37, 70, 48, 8, torch.float32, device=device)
    fn = lambda x: fastlora.lora_linear(x, *args[1:], 1.0, dropout_p=P, training=True)  # noqa: E731
    torch.manual_seed(3)
    fn(args[0]).square().sum().backward()
    plain = [t.grad.clone() for t in (args[0], args[3], args[4])]
    for t in (args[0], args[3], args[4]):
        t.grad = None
    torch.manual_seed(3)
    checkpoint(fn, args[0], use_reentrant=False).square().sum().backward()
    for g, t in zip(plain, (args[0], args[3], args[4])):
        assert torch.equal(g, t.grad)


# ---------------------------------------------------------------- integration

def test_torch_compile_fullgraph(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    fn = lambda x: fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=P, training=True, seed=5)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, bb)]
    for t in (x, a, bb):
        t.grad = None
    y_eager = fn(x)
    y_eager.square().sum().backward()
    assert torch.equal(y, y_eager)
    for g, t in zip(grads, (x, a, bb)):
        assert torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6)


def test_autocast_fp32_activations_with_16bit_weights(device):
    """Under autocast, fp32 x over a 16-bit base must run (cast as F.linear would)."""
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    w16, b16 = w.to(torch.float16), b.detach().to(torch.float16)
    with torch.autocast(device_type=x.device.type, dtype=torch.float16):
        y = fastlora.lora_linear(x, w16, b16, a, bb, 0.5)
    assert y.dtype == torch.float16
    ref = reference.lora_linear(x.double(), w16.double(), b16.double(), a.double(), bb.double(), 0.5)
    assert_close(y, ref, torch.float16, "autocast output")


def test_backend_override(monkeypatch, device):
    args = make(37, 70, 48, 8, torch.float32, device=device)
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    assert torch.equal(fastlora.lora_linear(*args, 0.5), reference.lora_linear(*args, 0.5))
    monkeypatch.setenv("FASTLORA_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND"):
        fastlora.lora_linear(*args, 0.5)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("break_it, error, match", [
    (lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, "features"),
    (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, "rank mismatch"),
    (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, "lora_B must be"),
    (lambda a: a.__setitem__(3, a[3][:, :-1]), ValueError, "lora_A must be"),
    (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, "bias must have shape"),
    (lambda a: a.__setitem__(0, a[0].to("meta")), ValueError, "different devices"),
    (lambda a: a.__setitem__(0, a[0].detach().to(torch.int32)), TypeError, "floating-point"),
    (lambda a: a.__setitem__(3, a[3].detach().to(torch.float16)), TypeError, "same dtype"),
    (lambda a: a.__setitem__(1, a[1].to(torch.float16)), TypeError, "same dtype"),
    (lambda a: a.__setitem__(0, a[0].detach().double()) or a.__setitem__(1, a[1].double()),
     TypeError, "do not support"),
])
def test_bad_input_raises(break_it, error, match, device):
    args = list(make(37, 70, 48, 8, torch.float32, device=device))
    break_it(args)
    with pytest.raises(error, match=match):
        fastlora.lora_linear(*args, 0.5)


def test_bad_scalars_raise(device):
    args = make(37, 70, 48, 8, torch.float32, device=device)
    with pytest.raises(ValueError, match="dropout_p"):
        fastlora.lora_linear(*args, 0.5, dropout_p=1.0, training=True)
    with pytest.raises(TypeError, match="scaling"):
        fastlora.lora_linear(*args, "0.5")


# ---------------------------------------------------------------- GPU, bf16, LLM sizes

@pytest.mark.gpu
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m, k, n, r", [(2048, 4096, 4096, 16), (16, 4096, 14336, 64),
                                        (1000, 14336, 4096, 100)])
def test_gpu_bf16_llm_sizes(m, k, n, r, p, adapter_dtype):
    args = make(m, k, n, r, torch.bfloat16, adapter_dtype=adapter_dtype, device="cuda")
    mask = dropout_mask(11, m, k, p, device="cuda") if p else None
    check(args, 2.0, torch.bfloat16, mask=mask, dropout_p=p, training=True, seed=11)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Forward and backward capture in a CUDA graph (after a warm-up that autotunes)."""
    x, w, b, a, bb = make(256, 1024, 768, 16, torch.bfloat16, device="cuda")
    static_x = x.detach().clone().requires_grad_()
    dy = torch.randn(256, 768, device="cuda", dtype=torch.bfloat16)

    def step():
        y = fastlora.lora_linear(static_x, w, b, a, bb, 2.0)
        y.backward(dy)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for t in (static_x, a, bb):
        t.grad = None
    with torch.cuda.graph(graph):
        y_static = step()
    with torch.no_grad():
        static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    y_ref, grads = reference_grads([static_x, w, b, a, bb], dy, 2.0)
    assert_close(y_static, y_ref, torch.bfloat16, "graph output")
    assert_close(static_x.grad, grads[0], torch.bfloat16, "graph grad x")
