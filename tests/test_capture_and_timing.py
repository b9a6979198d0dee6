"""CUDA-graph capture never autotunes (simulated capture on the CPU: a kernel with no tuned
config raises naming its shape before anything is timed), ``fastlora.warmup_multi`` and
``fastlora.warmup(quant4=True)`` run every kernel of a multi-adapter or 4-bit call
beforehand, and the chooser times what a caller pays
(whole stage calls, launches included, median of several rounds; a fake clock)."""
import pytest
import torch
import triton
import triton.language as tl

import fastlora
from data import generator, randn
from fastlora.choice import dispatch
from fastlora.choice.store import ChoiceCache
from fastlora.choice.dispatch import Chooser, Impl, LinearArgs, stage_ms
from fastlora.kernels import capture
from fastlora.kernels.common import tune
from spies import count_launches
from op_cases import K, N, make_bank


def simulate_capture(monkeypatch, on: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)


@triton.jit
def _scale_kernel(x_ptr, N, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    tl.store(x_ptr + cols, tl.load(x_ptr + cols, mask=cols < N) * 2.0, mask=cols < N)


def two_config_kernel():
    """A kernel autotuned over two configs as fastlora's are (``common.tune``)."""
    return tune(_scale_kernel, [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})],
                ["N"], prune=False)


def test_an_untuned_kernel_under_capture_raises_naming_its_shape(monkeypatch, device):
    kernel = two_config_kernel()
    x = torch.ones(8, device=device)
    simulate_capture(monkeypatch)
    with pytest.raises(RuntimeError, match=r"kernel _scale_kernel has no tuned config for "
                                           r"\[N=8\].*CUDA graph is being captured.*warmup"):
        kernel[(1,)](x, 8)
    assert torch.equal(x, torch.ones(8, device=device))  # nothing ran
    assert kernel.cache == {}


def test_a_tuned_kernel_under_capture_launches_its_config(monkeypatch, device):
    kernel = two_config_kernel()
    timed = []
    monkeypatch.setattr(kernel, "_bench", lambda *a, config, **k: timed.append(config) or [1.0] * 3)
    kernel = capture.guard(kernel)  # the guard over the fake timing
    x = torch.ones(8, device=device)
    kernel[(1,)](x, 8)  # tuned outside the capture
    assert len(timed) == 2
    simulate_capture(monkeypatch)
    kernel[(1,)](x, 8)
    assert len(timed) == 2 and torch.equal(x, torch.full((8,), 4.0, device=device))
    with pytest.raises(RuntimeError, match=r"\[N=5\]"):  # another key
        kernel[(1,)](x, 5)


def test_every_kernel_goes_through_the_guard():
    from fastlora.kernels import aot, linear

    tuners = {id(v.kernel): v.kernel for v in aot.VARIANTS}
    tuners.update({id(k): k for k in linear.MULTI_KERNELS.values()})
    assert all(t._bench.__qualname__.startswith("guard.") for t in tuners.values())


def test_warmup_multi_runs_the_calls_kernels(monkeypatch, device, multi_path):
    """Forward (the shrink and the fused linear) and, in training, the backward's."""
    weight, bias, bank = make_bank([4, 8, 2], [False, True, False], device=device)
    launched = count_launches(monkeypatch)
    assert fastlora.warmup_multi((2, 5, K), weight, bias, bank) is None
    assert launched == ["_lora_shrink_kernel", "_lora_linear_kernel"]
    launched.clear()
    fastlora.warmup_multi((7, K), weight, bias, bank, training=True)
    assert sorted(set(launched)) == ["_lora_da_kernel", "_lora_dy_kernel", "_lora_linear_kernel",
                                     "_lora_shrink_kernel"]
    assert launched.count("_lora_linear_kernel") == 2  # forward and dx


def test_warmup_runs_a_4bit_layer_s_kernels(monkeypatch, device):
    """``quant4``: a 4-bit weight's forward and backward kernels, nothing to choose."""
    launched = count_launches(monkeypatch)
    out = fastlora.warmup((5, 128), (96, 128), 8, dtype=torch.float16, quant4=True,
                          dropout_p=0.1, device=device)
    assert [(e.stage, e.key.split()[-1]) for e in out] == [("forward", "+quant4"),
                                                           ("dx", "+quant4")]
    assert launched == ["_lora_shrink_kernel", "_lora_linear_kernel", "_lora_dy_kernel",
                        "_lora_da_kernel", "_lora_linear_kernel"]


def test_warmup_multi_spreads_the_rows_over_a_bank_s_loaded_slots(monkeypatch, device):
    """An AdapterBank with empty slots (an index on one raises): the rows go to the two
    loaded adapters."""
    from fastlora.adapters.bank import AdapterBank

    layer = torch.nn.Linear(K, N, device=device)
    bank = AdapterBank(layer, capacity=4)
    g = generator(3)
    for name in ("t0", "t1"):
        bank.add(name, randn(4, K, g=g, device=device), randn(N, 4, g=g, device=device), 1.0)
    bank.unload("t0")
    bank.add("t2", randn(8, K, g=g, device=device), randn(N, 8, g=g, device=device), 1.0)
    launched = count_launches(monkeypatch)
    fastlora.warmup_multi((6, K), layer.weight, layer.bias, bank)
    assert launched == ["_lora_shrink_kernel", "_lora_linear_kernel"]


class GpuQueue:
    """A fake device: each launch costs the host ``launch_ms`` and the device ``gpu_ms``
    (queued behind earlier work); ``sync`` waits for the queue. Times in ms."""

    def __init__(self):
        self.host = self.gpu = 0.0

    def clock(self) -> float:
        return self.host / 1e3

    def launch(self, launch_ms: float, gpu_ms: float) -> None:
        self.host += launch_ms
        self.gpu = max(self.gpu, self.host) + gpu_ms

    def sync(self) -> None:
        self.host = max(self.host, self.gpu)


def test_stage_ms_is_what_a_caller_pays_per_call():
    q = GpuQueue()
    calls = []

    def stage():  # two launches: host-bound (8 us of launches, 3 us of GPU work)
        calls.append(1)
        q.launch(0.004, 0.001)
        q.launch(0.004, 0.002)

    assert stage_ms(stage, q.sync, q.clock) == pytest.approx(0.008, rel=0.01)
    assert len(calls) > 2 + dispatch.ROUNDS  # rounds of several calls, the first untimed
    q2 = GpuQueue()
    gpu_bound = stage_ms(lambda: q2.launch(0.004, 0.050), q2.sync, q2.clock)
    assert gpu_bound == pytest.approx(0.050, rel=0.1)


def test_the_chooser_sees_an_extra_launch_at_decode_sizes():
    """cuBLAS then fastlora's pass: two launches, less GPU time than the fused kernel's one;
    at decode sizes the host's launches decide, and the whole-call timing sees them (GPU
    time alone would pick cublas)."""
    q = GpuQueue()
    cost = {"fused": [(0.006, 0.010)], "cublas": [(0.006, 0.004), (0.006, 0.004)],
            "tma": [(0.020, 0.009)]}

    def launcher(name):
        def launch(*args, **kwargs):
            for launch_ms, gpu_ms in cost[name]:
                q.launch(launch_ms, gpu_ms)
        return launch

    impls = {name: Impl(name, launcher(name), lambda args: None) for name in cost}
    chooser = Chooser(impls, ChoiceCache(), lambda name, fn: stage_ms(fn, q.sync, q.clock))
    g = generator(0)
    args = LinearArgs(randn(16, 64, g=g), randn(32, 64, g=g).t())
    assert chooser.choose(args).name == "fused"
    gpu_only = {name: sum(ms for _, ms in launches) for name, launches in cost.items()}
    assert min(gpu_only, key=gpu_only.get) == "cublas"


@pytest.mark.gpu
@pytest.mark.gpu_smoke
def test_gpu_capture_refuses_an_untuned_shape_and_replays_after_warmup_multi():
    """A multi-adapter decode call first seen inside a capture raises naming the kernel's
    shape (instead of timing configs inside the capture); after ``warmup_multi`` the same
    call captures, and its replay equals the eager call."""
    from fastlora import multi_lora_linear

    weight, bias, bank = make_bank([16, 8, 16], [False, True, False], dtype=torch.bfloat16,
                                   k=1024, n=768, seed=5, device="cuda")
    g = generator(6)
    x = randn(37, 1024, g=g, device="cuda", dtype=torch.bfloat16)
    index = torch.arange(37, device="cuda", dtype=torch.int32) % 3
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"has no tuned config for \[M_BUCKET=64"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            multi_lora_linear(x, weight, bias, bank, index)
    torch.cuda.synchronize()
    fastlora.warmup_multi((37, 1024), weight, bias, bank)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = multi_lora_linear(x, weight, bias, bank, index)
    graph.replay()
    assert torch.equal(y, multi_lora_linear(x, weight, bias, bank, index))
