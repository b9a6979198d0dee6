"""fastlora.lora_linear (Triton kernels; the interpreter on CPU) against the reference.

Every input comes from tests/data.py (seeded, drawn on the CPU, then moved to the device
under test); outputs and gradients are compared with the float64 reference within a
tolerance relative to the magnitudes of the terms they sum (tests/tolerances.py), so
gradients reduced with atomics (not bit-reproducible on a GPU) never need equality.
"""
import pytest
import torch

import fastlora
from common import capture
from data import generator, randn
from fastlora import functional, reference
from fastlora.kernels import dropout_mask
from helpers import assert_close
from op_cases import P, SHAPES, check_lora, compare, make, reference_grads, upstream
from tolerances import term_magnitudes


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_grads(shape, dtype, bias, device):
    check_lora(make(*shape, dtype, bias=bias, device=device), 0.5, dtype)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
def test_fp32_adapter_over_fp16_base(shape, device):
    """PEFT's default (autocast_adapter_dtype=True): fp32 A/B over fp16 x and W."""
    args = make(*shape, torch.float16, adapter_dtype=torch.float32, device=device)
    check_lora(args, 2.0, torch.float16)
    assert args[3].dtype == torch.float32
    # the adapter gradients come back in the adapter's dtype
    assert args[3].grad.dtype == args[4].grad.dtype == torch.float32


def test_3d_noncontiguous_input(device):
    _, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    x3 = randn(3, 70, 13, g=generator(1), device=device).transpose(1, 2).requires_grad_()
    assert not x3.is_contiguous()  # [3, 13, 70]
    check_lora([x3, w, b, a, bb], 1.5, torch.float32)


def test_expanded_output_gradient(device):
    """y.sum() sends back a stride-0 gradient: launchers must not assume contiguity."""
    args = make(37, 70, 48, 8, torch.float32, device=device)
    y = fastlora.lora_linear(*args, 0.5)
    y.sum().backward()
    compare(lambda *a: reference.lora_linear(*a, 0.5), args, y,
            torch.ones(37, 48, device=device), torch.float32)


def test_trainable_base_weight(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    check_lora([x, w.requires_grad_(), b, a, bb], 0.5, torch.float32)


def test_empty_batch(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    y = fastlora.lora_linear(x[:0], w, b, a, bb, 0.5)
    assert y.shape == (0, 48)


@pytest.mark.parametrize("shape", [(1, 48, 70, 1), (37, 130, 70, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp32_adapters_error_vs_fp64(shape, device):
    """fp32 adapters (PEFT's default dtype) at torch's default matmul precision: the
    error of the kernels against the float64 reference stays at PEFT's fp32 level.
    Measured in the interpreter over seeds 0-99 of these shapes: at most 1.8 units of fp32
    roundoff of the terms' magnitudes (about 1.1e-7 relative); the bound here is 64 units
    (3.8e-6). On a GPU the fp32 dots run as tf32x3: see test_tf32x3_products_keep_fp32_accuracy
    and test_gpu_fp32_adapters_error_vs_fp64."""
    assert torch.get_float32_matmul_precision() == "highest"
    args = make(*shape, torch.float32, device=device)
    y = fastlora.lora_linear(*args, 0.5)
    dy = upstream(y, 0)
    y.backward(dy)
    fn = lambda *a: reference.lora_linear(*a, 0.5)  # noqa: E731
    y_ref, grads_ref = reference_grads(fn, args, dy)
    y_mag, grads_mag = term_magnitudes(fn, args, dy)
    for got, ref, mag in [(y, y_ref, y_mag), *((a.grad, r, m) for a, r, m in
                                              zip(args, grads_ref, grads_mag) if r is not None)]:
        units = ((got.double() - ref).abs() / mag.clamp_min(1e-300)).max().item() / 2.0 ** -24
        assert units <= 64, f"error {units:.1f} units of fp32 roundoff of the term magnitudes"


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 mantissa bits), rounded to nearest (ties away), kept in fp32."""
    return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The "tf32x3" product the kernels' fp32 dots run on a GPU (kernels.common.FULL_FP32):
    each operand split into a TF32 head and a TF32 tail, three TF32 products (exact in
    fp32), fp32 accumulation."""
    a_hi, b_hi = _tf32(a), _tf32(b)
    a_lo, b_lo = _tf32(a - a_hi), _tf32(b - b_hi)
    return a_hi @ b_hi + (a_hi @ b_lo + a_lo @ b_hi)


@pytest.mark.parametrize("m, k, n", [(64, 4096, 16), (64, 14336, 16), (64, 16, 4096)],
                         ids=["shrink", "shrink-14k", "expand"])
def test_tf32x3_products_keep_fp32_accuracy(m, k, n):
    """The numerics of the GPU's fp32 dots, emulated on the CPU on LoRA's shapes: tf32x3
    stays within 16 units of fp32 roundoff of the term magnitudes (measured: <= ~5, as
    fp32 itself), where plain TF32 is off by hundreds to thousands of units."""
    g = generator(0)
    a, b = randn(m, k, g=g), randn(k, n, g=g, scale=k ** -0.5)
    ref, terms = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    units = lambda got: ((got.double() - ref).abs() / terms).max().item() / 2.0 ** -24  # noqa: E731
    assert units(_tf32x3_matmul(a, b)) <= 16
    assert units(_tf32(a) @ _tf32(b)) > 128  # TF32 would not pass the fp32 tolerance


# ---------------------------------------------------------------- dropout

def test_dropout_matches_reference_with_same_mask(device):
    mask = dropout_mask(1234, 300, 130, P, device=device)
    check_lora(make(300, 130, 70, 16, torch.float32, device=device), 0.7, torch.float32, mask=mask,
          dropout_p=P, training=True, seed=1234)


def test_dropout_deterministic_per_seed(device):
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    run = lambda **kw: fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=P, training=True, **kw)  # noqa: E731
    assert torch.equal(run(seed=7), run(seed=7))
    assert not torch.equal(run(seed=7), run(seed=8))
    gen = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    assert torch.equal(run(generator=gen()), run(generator=gen()))
    assert not torch.equal(run(), run())  # a fresh seed per call


def test_graph_replay_mechanism_draws_fresh_masks(device):
    """What a CUDA-graph replay does, on any device: the kernels read the seed from a device
    tensor, so the same launch (same tensor) draws a new mask once the captured
    ``torch.randint`` has written a new value; an explicit seed reproduces its mask."""
    dev = torch.device(device)
    seed = functional._seed(None, None, dev)
    assert seed.device == dev and seed.dtype == torch.int64
    first = dropout_mask(seed, 64, 70, P)
    seed.copy_(functional._seed(None, None, dev))  # a replay redraws into the same tensor
    second = dropout_mask(seed, 64, 70, P)
    assert not torch.equal(first, second)
    assert torch.equal(dropout_mask(functional._seed(123, None, dev), 64, 70, P),
                       dropout_mask(functional._seed(123, None, dev), 64, 70, P))


def test_backward_reuses_the_forward_seed(device):
    """A drawn seed (no ``seed=``): the backward regenerates the forward's mask."""
    args = make(300, 130, 70, 16, torch.float32, device=device)
    gen = lambda: torch.Generator(device=device).manual_seed(5)  # noqa: E731
    mask = dropout_mask(functional._seed(None, gen(), torch.device(device)), 300, 130, P)
    check_lora(args, 0.7, torch.float32, mask=mask, dropout_p=P, training=True, generator=gen())


def test_seed_on_the_pytorch_backend(monkeypatch, device):
    """seed= is honoured by the reference too (its mask differs from the kernels')."""
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    run = lambda seed: fastlora.lora_linear(x, w, b, a, bb, 1.0, dropout_p=P, training=True, seed=seed)  # noqa: E731
    assert torch.equal(run(123), run(123))
    assert not torch.equal(run(123), run(124))
    want = reference.lora_linear(x, w, b, a, bb, 1.0, dropout_p=P, training=True,
                                 generator=torch.Generator(device=device).manual_seed(123))
    assert torch.equal(run(123), want)


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


def _rng_devices(device):
    return [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []


def test_dropout_under_checkpointing_recomputes_same_mask(device):
    """Checkpointing restores the RNG state for the recomputation, so the drawn seed (and
    mask) is the forward's: gradients equal those of a plain run from the same RNG state
    (within the tolerance of atomics-reduced sums; the bound is the no-dropout term
    magnitude scaled by 1 / (1 - p), which holds for any mask)."""
    from torch.utils.checkpoint import checkpoint

    args = make(37, 70, 48, 8, torch.float32, device=device)
    fn = lambda x: fastlora.lora_linear(x, *args[1:], 1.0, dropout_p=P, training=True)  # noqa: E731
    trained = (args[0], args[3], args[4])
    dy = upstream(torch.empty(37, 48, device=device), 0)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        fn(args[0]).backward(dy)
    plain = [t.grad.clone() for t in trained]
    for t in trained:
        t.grad = None
    with torch.random.fork_rng(devices=_rng_devices(device)):
        checkpoint(fn, args[0], use_reentrant=False).backward(dy)
    _, mags = term_magnitudes(lambda *a: reference.lora_linear(*a, 1.0 / (1.0 - P)), args, dy)
    for name, want, t, mag in zip(["x", "lora_A", "lora_B"], plain, trained, mags[:1] + mags[3:]):
        assert_close(t.grad, want.double(), torch.float32, f"checkpointed grad {name}", mag)


# ---------------------------------------------------------------- integration

def test_torch_compile_fullgraph(device):
    args = make(37, 70, 48, 8, torch.float32, device=device)
    x, w, b, a, bb = args
    fn = lambda x: fastlora.lora_linear(x, w, b, a, bb, 0.5, dropout_p=P, training=True, seed=5)  # noqa: E731
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(y, fn(x))  # the forward reduces without atomics: bit-equal
    dy = upstream(y, 0)
    y.backward(dy)
    mask = dropout_mask(5, 37, 70, P, device=device)
    compare(lambda *t: reference.lora_linear(*t, 0.5, dropout_p=P, training=True,
                                             dropout_mask=mask), args, y, dy, torch.float32)


def test_autocast_fp32_activations_with_16bit_weights(device):
    """Under autocast, fp32 x over a 16-bit base must run (cast as F.linear would)."""
    x, w, b, a, bb = make(37, 70, 48, 8, torch.float32, device=device)
    w16, b16 = w.to(torch.float16), b.detach().to(torch.float16)
    with torch.autocast(device_type=x.device.type, dtype=torch.float16):
        y = fastlora.lora_linear(x, w16, b16, a, bb, 0.5)
    assert y.dtype == torch.float16
    args = [x.half(), w16, b16, a, bb]
    fn = lambda *t: reference.lora_linear(*t, 0.5)  # noqa: E731
    assert_close(y, fn(*[t.double() for t in args]), torch.float16, "autocast output",
                 term_magnitudes(fn, args)[0])


def test_backend_override(monkeypatch, device):
    args = make(37, 70, 48, 8, torch.float32, device=device)
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    assert torch.equal(fastlora.lora_linear(*args, 0.5), reference.lora_linear(*args, 0.5))
    monkeypatch.setenv("FASTLORA_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND"):
        fastlora.lora_linear(*args, 0.5)


def test_bf16_refused_in_the_interpreter(monkeypatch):
    """The interpreter's bf16 matmuls are wrong: refused with the reason, while bf16 on
    the CPU's PyTorch backend works. (CPU tensors on purpose, on every machine.)"""
    args = make(37, 70, 48, 8, torch.bfloat16)
    monkeypatch.delenv("FASTLORA_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="bfloat16 under TRITON_INTERPRET=1"):
        fastlora.lora_linear(*args, 0.5)
    fp32_adapter = list(args[:3]) + [t.detach().float() for t in args[3:]]
    with pytest.raises(RuntimeError, match="bfloat16"):
        fastlora.lora_linear(*fp32_adapter, 0.5)
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    y = fastlora.lora_linear(*args, 0.5)
    fn = lambda *t: reference.lora_linear(*t, 0.5)  # noqa: E731
    assert_close(y, fn(*[t.double() for t in args]), torch.bfloat16, "bf16 on the reference",
                 term_magnitudes(fn, args)[0])


def test_every_launcher_runs_on_its_input_device():
    """Each launcher enters its input's CUDA device (kernels.common.on_device) before it
    launches: Triton launches on the current device, not the tensors'."""
    from fastlora import kernels

    launchers = [kernels.lora_shrink, kernels.fused_linear, kernels.lora_dy, kernels.lora_da,
                 kernels.dora_norm, kernels.multi_lora_shrink, kernels.multi_fused_linear,
                 kernels.multi_lora_dy, kernels.multi_lora_da]
    assert all(f.__code__ is kernels.common.on_device(f.__wrapped__).__code__ for f in launchers)


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
    check_lora(args, 2.0, torch.bfloat16, mask=mask, dropout_p=p, training=True, seed=11)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n, r", [(2048, 4096, 4096, 16), (16, 4096, 14336, 64)])
def test_gpu_fp32_adapters_error_vs_fp64(m, k, n, r):
    """fp32 adapters over a bf16 base at the default "highest" precision (tf32x3 dots)."""
    assert torch.get_float32_matmul_precision() == "highest"
    args = make(m, k, n, r, torch.bfloat16, adapter_dtype=torch.float32, device="cuda")
    check_lora(args, 2.0, torch.bfloat16)
    args = make(m, k, n, r, torch.float32, device="cuda")
    check_lora(args, 2.0, torch.float32)


@pytest.mark.gpu
@pytest.mark.gpu_smoke
def test_gpu_cuda_graph_replay(monkeypatch):
    """Forward and backward capture in a CUDA graph: fastlora.warmup chooses the
    implementation of every linear stage beforehand (nothing is timed afterwards), then a
    warm-up step on the side stream autotunes."""
    from fastlora.choice import dispatch

    for e in fastlora.warmup((256, 1024), (768, 1024), 16, dtype=torch.bfloat16, device="cuda"):
        assert e.why == "measured" and e.impl in e.timings_ms, str(e)

    def no_timing(*args):
        raise AssertionError("a linear stage was timed after fastlora.warmup")

    monkeypatch.setattr(dispatch, "_cuda_stage_ms", no_timing)
    x, w, b, a, bb = make(256, 1024, 768, 16, torch.bfloat16, device="cuda")
    static_x = x.detach().clone().requires_grad_()
    dy = randn(256, 768, g=generator(3), device="cuda", dtype=torch.bfloat16)
    out = {}

    def step():  # fresh gradients inside the graph (none accumulates over replays)
        for t in (static_x, b, a, bb):
            t.grad = None
        out["y"] = fastlora.lora_linear(static_x, w, b, a, bb, 2.0)
        out["y"].backward(dy)

    graph = capture(step)
    with torch.no_grad():
        static_x.copy_(randn(256, 1024, g=generator(4), device="cuda", dtype=torch.bfloat16))
    graph.replay()
    compare(lambda *t: reference.lora_linear(*t, 2.0), [static_x, w, b, a, bb], out["y"], dy,
            torch.bfloat16)


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_draw_fresh_dropout_masks():
    """A captured training step redraws the seed on every replay (new masks); with seed=
    the captured seed is fixed, and forward and backward use the same mask."""
    args = make(256, 1024, 768, 16, torch.bfloat16, device="cuda")
    dy = randn(256, 768, g=generator(3), device="cuda", dtype=torch.bfloat16)
    for seed in (None, 7):
        out = {}

        def step():
            for t in (args[0], args[2], args[3], args[4]):
                t.grad = None
            out["y"] = fastlora.lora_linear(*args, 2.0, dropout_p=0.1, training=True, seed=seed)
            out["y"].backward(dy)

        graph = capture(step)
        graph.replay()
        first = out["y"].clone()
        graph.replay()
        assert torch.equal(first, out["y"]) == (seed is not None)
    mask = dropout_mask(7, 256, 1024, 0.1, device="cuda")
    compare(lambda *t: reference.lora_linear(*t, 2.0, dropout_p=0.1, training=True,
                                             dropout_mask=mask), args, out["y"], dy, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device_while_first_is_current():
    """A layer on cuda:1 launches there although cuda:0 is the current device."""
    torch.cuda.set_device(0)
    args = make(37, 70, 48, 8, torch.float16, device="cuda:1")
    check_lora(args, 0.5, torch.float16, dropout_p=P, training=True, seed=3,
          mask=dropout_mask(3, 37, 70, P, device="cuda:1"))


@pytest.mark.gpu
def test_gpu_deterministic_mode_runs_the_reference(monkeypatch):
    """Under torch.use_deterministic_algorithms the ops run the PyTorch reference (the
    kernels' backward reduces with atomics): gradients are bit-identical run to run."""
    from fastlora.choice import backend

    monkeypatch.setattr(backend, "_warned_deterministic", False)
    args = make(300, 130, 70, 16, torch.float32, device="cuda")
    grads = []
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="use_deterministic_algorithms"):
            for _ in range(2):
                for t in args:
                    if t is not None:
                        t.grad = None
                y = fastlora.lora_linear(*args, 0.5)
                y.backward(upstream(y, 0))
                grads.append([args[i].grad.clone() for i in (0, 3, 4)])
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
