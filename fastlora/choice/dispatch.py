"""Which implementation runs the linear stage, chosen by measurement.

The linear stage is ``kernels.fused_linear``'s contract, ``g_out * (a @ (g_in * b) + scale *
keep * (l @ lb)) + bias``: the LoRA and DoRA forward (a = x, b = W^T) and their input
gradient (a = dY, b = W) run it. Its implementations (``IMPLS``):

* ``fused``: the fused Triton GEMM, pointer loads, one tile per program; runs wherever the
  kernels run and is the default;
* ``cublas``: ``torch.mm`` (cuBLAS) for ``a @ b``, then fastlora's kernel adds the low-rank
  term, DoRA's column factor and the bias into that output in place;
* ``tma``: a persistent kernel on TMA descriptors, sm_90 only.

Each op stage has its candidates: ``FORWARD`` and ``LORA_DX`` all three, ``DORA_DX``
fused and tma (cuBLAS cannot scale dY's columns, the reduction dimension, inside its
product). A bitsandbytes 4-bit weight (b a ``kernels.Quant4``) has one: ``fused``,
which dequantizes each tile in registers (``QUANT4_UNAVAILABLE`` says why not the others);
nothing is timed for it. On the first call for a key (``StageSpec.key``: device, dtypes, M bucket, N, K,
rank bucket, layouts, flags) every candidate that can take the call is timed as the user
pays for it (``stage_ms``: whole stage calls, host work and every launch included, back to
back in rounds closed by a synchronization, median of the rounds; the first call, which
compiles and autotunes, excluded; nothing allocated), the fastest is kept in memory and on disk
(``fastlora.choice.store``), and no later call with that key is timed again: a later call
costs one tuple lookup (``Chooser.run``). Nothing is timed while a CUDA graph is being
captured: a cached choice runs, else the default (with a warning, once);
``fastlora.warmup`` measures beforehand (and a Triton kernel never tunes inside a capture:
``kernels.capture``). ``FASTLORA_IMPL=fused|cublas|tma`` forces one in
every stage that has it (the others run their default); a call it cannot take raises.
CPU tensors (the Triton interpreter) are not timed: the default runs.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import kernels
from .store import Choice, ChoiceCache
from ..kernels.capture import capturing
from ..kernels.common import m_bucket, next_pow2

IMPL_ENV = "FASTLORA_IMPL"
DEFAULT = "fused"

# the candidates of each op stage (the first is the default)
FORWARD = ("fused", "cublas", "tma")
LORA_DX = ("fused", "cublas", "tma")
DORA_DX = ("fused", "tma")
QUANT4 = ("fused",)  # every stage over a 4-bit weight
QUANT4_UNAVAILABLE = {
    "cublas": "a 4-bit weight: cuBLAS multiplies 16/32-bit matrices, so it would need the "
              "dequantized N x K weight in memory (what PEFT's Linear4bit builds per call)",
    "tma": "a 4-bit weight: the TMA kernel loads 16/32-bit tiles of W",
}


@dataclass
class LinearArgs:
    """One linear-stage call: ``kernels.fused_linear``'s arguments."""
    a: torch.Tensor
    b: torch.Tensor
    low: kernels.Term | None = None
    bias: torch.Tensor | None = None
    out_dtype: torch.dtype | None = None
    g_out: torch.Tensor | None = None
    g_in: torch.Tensor | None = None


@dataclass(frozen=True)
class Impl:
    """One implementation: a launcher with ``fused_linear``'s signature and the reason it
    cannot take a call (None when it can)."""
    name: str
    launch: Callable[..., torch.Tensor]
    unsupported: Callable[[LinearArgs], str | None]

    def __call__(self, args: LinearArgs) -> torch.Tensor:
        return self.launch(args.a, args.b, args.low, args.bias, args.out_dtype,
                           g_out=args.g_out, g_in=args.g_in)


IMPLS = {impl.name: impl for impl in [
    Impl("fused", kernels.fused_linear, lambda args: None),
    Impl("cublas", kernels.cublas_linear,
         lambda args: kernels.cublas_unsupported(args.a, args.out_dtype, args.g_in)),
    Impl("tma", kernels.tma_linear,
         lambda args: kernels.tma_unsupported(args.a, args.b, args.out_dtype)),
]}


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "-"


@dataclass(frozen=True)
class StageSpec:
    """What a choice depends on: sizes (the key buckets M to a power of two up to 8192, as
    the kernels' autotune keys do, and r to a power of two), dtypes, layouts (a row-major;
    b given as W^T ``[K, N]`` of a row-major ``[N, K]``: ``b_nk``, the forward; ``aligned``:
    a's and b's rows contiguous and starting on 16-byte boundaries, as TMA needs), flags,
    and the stage's candidates ``impls``."""
    m: int
    n: int
    k: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype | None
    out_dtype: torch.dtype
    a_row_major: bool = True
    b_nk: bool = True
    aligned: bool = True
    dropout: bool = False
    bias: bool = False
    g_out: bool = False
    g_in: bool = False
    impls: tuple[str, ...] = FORWARD
    quant4: bool = False

    @classmethod
    def of(cls, args: LinearArgs, impls: tuple[str, ...] = FORWARD) -> StageSpec:
        (m, k), n = args.a.shape, args.b.shape[1]
        low = args.low
        return cls(m, n, k, low.l.ptr.shape[1] if low is not None else 0, args.a.dtype,
                   low.lb.ptr.dtype if low is not None else None, args.out_dtype or args.a.dtype,
                   args.a.stride(1) == 1, args.b.stride(0) == 1 and n > 1,
                   kernels.tma_layout_unsupported(args.a, args.b) is None,
                   low is not None and low.dropout_p > 0.0, args.bias is not None,
                   args.g_out is not None, args.g_in is not None, impls)

    def key(self) -> str:
        flags = [name for name in ("dropout", "bias", "g_out", "g_in", "quant4")
                 if getattr(self, name)]
        flags += [] if self.aligned else ["unaligned"]
        return (f"m{m_bucket(self.m)} n{self.n} k{self.k} r{next_pow2(self.r) if self.r else 0} "
                f"{_name(self.dtype)}/{_name(self.adapter_dtype)}->{_name(self.out_dtype)} "
                f"a:{'rows' if self.a_row_major else 'strided'} b:{'nk' if self.b_nk else 'kn'}"
                + "".join(f" +{f}" for f in flags))

    def synthetic(self, device, generator: torch.Generator) -> LinearArgs:
        """Random operands of this spec, laid out as the ops pass them (for timing);
        ``generator`` is on ``device``."""
        def randn(*shape, dtype=self.dtype):
            return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

        a = randn(self.m, self.k) if self.a_row_major else randn(self.k, self.m).t()
        b = randn(self.n, self.k).t() if self.b_nk else randn(self.k, self.n)
        low = None
        if self.r:
            # the forward's lb is B^T (B [N, r] row-major), the dx pass's is A [r, K]
            lb = (randn(self.n, self.r, dtype=self.adapter_dtype).t() if self.b_nk else
                  randn(self.r, self.n, dtype=self.adapter_dtype))
            # the kernels load the dropout seed from an int64 [1] tensor on the device
            seed = torch.zeros(1, dtype=torch.int64, device=device) if self.dropout else None
            low = kernels.term(randn(self.m, self.r, dtype=torch.float32), lb, 1.0,
                               0.1 if self.dropout else 0.0, seed)
        g_out = randn(self.n, dtype=torch.float32) if self.g_out else None
        g_in = randn(self.k, dtype=torch.float32) if self.g_in else None
        return LinearArgs(a, b, low, randn(self.n) if self.bias else None, self.out_dtype,
                          g_out, g_in)


@dataclass
class Explanation:
    """Which implementation runs one stage of a layer call, why, and the median times (ms)
    that chose it."""
    stage: str
    key: str
    impl: str
    why: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        times = ", ".join(f"{name} {ms:.4g} ms" for name, ms in self.timings_ms.items())
        skipped = "; ".join(f"{name}: {reason}" for name, reason in self.unavailable.items())
        text = f"{self.stage} [{self.key}]: {self.impl} ({self.why}"
        text += (f": {times})" if times else ")")
        return text + (f"; not run: {skipped}" if skipped else "")


def device_name(device: torch.device) -> str:
    """The GPU model (what a choice file is named for), or the device type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


ROUNDS = 7  # timed rounds per candidate (the median is kept)
ROUND_MS = 5.0  # about how long one round of back-to-back calls lasts
MAX_CALLS = 200  # calls per round at most


def stage_ms(fn: Callable[[], object], sync: Callable[[], object],
             clock: Callable[[], float] = time.perf_counter) -> float:
    """Median ms of one ``fn()``, a whole stage call (host work and every launch of it
    included: what a caller pays), by ``clock`` (seconds) over ``ROUNDS`` rounds of
    back-to-back calls, each round closed by ``sync()``. The first call (compilation,
    the kernels' autotuning) is not timed; a second sizes the rounds to about ``ROUND_MS``.
    Allocates nothing of its own (no cache flush: every candidate runs on warm caches
    alike)."""
    fn()
    sync()
    start = clock()
    fn()
    sync()
    once_ms = (clock() - start) * 1e3
    calls = max(1, min(MAX_CALLS, int(ROUND_MS / max(once_ms, 1e-3))))
    rounds = []
    for _ in range(ROUNDS):
        start = clock()
        for _ in range(calls):
            fn()
        sync()
        rounds.append((clock() - start) * 1e3 / calls)
    return statistics.median(rounds)


def _cuda_stage_ms(fn: Callable[[], object], device: torch.device) -> float:
    with torch.cuda.device(device):
        return stage_ms(fn, lambda: torch.cuda.synchronize(device))


def _call_key(impls: tuple[str, ...], a: torch.Tensor, b: torch.Tensor,
              low: kernels.Term | None, bias, out_dtype, g_out, g_in) -> tuple:
    """A hashable key with every fact the choice for a call depends on, built without
    strings: finer than ``StageSpec.key`` (M by ``(M - 1).bit_length()``, exact r and
    strides, the pointers' 16-byte offsets) and holding ``FASTLORA_IMPL``, so that setting
    it takes effect."""
    m, k = a.shape
    return (impls, os.environ.get(IMPL_ENV), a.get_device(), a.dtype, out_dtype,
            (m - 1).bit_length(), k, b.shape[1], a.stride(), b.stride(),
            (a.data_ptr() | b.data_ptr()) & 15,
            (low.lb.ptr.dtype, low.l.ptr.shape[1], low.dropout_p > 0.0) if low is not None
            else None,
            bias is None, g_out is None, g_in is None)


class Chooser:
    """Picks, per key, the fastest of a stage's candidates that can take a call.

    ``timer(name, fn) -> ms`` replaces the GPU timing (``stage_ms`` on CUDA; tests inject
    it, and with it CPU calls are timed too); ``capturing() -> bool`` replaces the
    CUDA-graph capture check.
    """

    def __init__(self, impls: dict[str, Impl] = IMPLS, cache: ChoiceCache | None = None,
                 timer: Callable[[str, Callable[[], object]], float] | None = None,
                 capturing: Callable[[], bool] = capturing, default: str = DEFAULT):
        self.impls = impls
        self.cache = cache if cache is not None else ChoiceCache()
        self.timer = timer
        self.capturing = capturing
        self.default = default
        self._warned_capture = False
        self._settled: dict[tuple, Impl] = {}  # _call_key -> final choice

    def forced(self) -> str | None:
        """The implementation ``FASTLORA_IMPL`` names, if set."""
        name = os.environ.get(IMPL_ENV, "").strip().lower()
        if name and name not in self.impls:
            raise ValueError(f"{IMPL_ENV}={name!r}: expected one of {', '.join(self.impls)}")
        return name or None

    def _times(self, device: torch.device) -> bool:
        return self.timer is not None or device.type == "cuda"

    def run(self, impls: tuple[str, ...], a: torch.Tensor, b: torch.Tensor,
            low: kernels.Term | None = None, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None, g_out: torch.Tensor | None = None,
            g_in: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's result from the implementation chosen for this call (``impls``: the
        stage's candidates); a settled key costs one dictionary lookup."""
        impl = self._settled.get(_call_key(impls, a, b, low, bias, out_dtype, g_out, g_in))
        if impl is None:
            impl = self.choose(LinearArgs(a, b, low, bias, out_dtype, g_out, g_in), impls)
        return impl.launch(a, b, low, bias, out_dtype, g_out=g_out, g_in=g_in)

    def choose(self, args: LinearArgs, impls: tuple[str, ...] = FORWARD) -> Impl:
        """The implementation for this call; times the candidates on a key's first call."""
        return self.decide(args, impls)[0]

    def decide(self, args: LinearArgs, impls: tuple[str, ...] = FORWARD) -> tuple[Impl, bool]:
        """(the implementation for this call, whether the choice is final for its key: a
        launch plan may keep it)."""
        key = _call_key(impls, args.a, args.b, args.low, args.bias, args.out_dtype,
                        args.g_out, args.g_in)
        impl = self._settled.get(key)
        if impl is not None:
            return impl, True
        impl, settled = self._choose(args, impls)
        if settled:
            self._settled[key] = impl
        return impl, settled

    def _choose(self, args: LinearArgs, impls: tuple[str, ...]) -> tuple[Impl, bool]:
        """(the implementation, whether that choice is final for the key)."""
        forced = self.forced()
        if forced:
            if forced not in impls:
                return self.impls[self.default], True
            reason = self.impls[forced].unsupported(args)
            if reason:
                raise RuntimeError(f"{IMPL_ENV}={forced} cannot run this call: {reason}")
            return self.impls[forced], True
        if not self._times(args.a.device):
            return self.impls[self.default], True
        unavailable = {name: reason for name in impls
                       if (reason := self.impls[name].unsupported(args))}
        usable = [name for name in impls if name not in unavailable]
        device, key = device_name(args.a.device), StageSpec.of(args, impls).key()
        choice = self.cache.get(device, key)
        if choice is not None:
            timed = [name for name in usable if name in choice.timings_ms]
            if len(timed) == len(usable) > 1:
                return self.impls[min(timed, key=choice.timings_ms.__getitem__)], True
            if usable == [choice.impl]:
                return self.impls[choice.impl], True
            # else an entry this call's candidates disagree with (an edited file): re-time
        if len(usable) == 1:
            self.cache.put(device, key, Choice(usable[0], {}, unavailable))
            return self.impls[usable[0]], True
        if self.capturing():
            if not self._warned_capture:
                warnings.warn(
                    f"fastlora: no measured implementation for [{key}] on {device} while a CUDA "
                    f"graph is being captured (nothing can be timed then): running "
                    f"'{self.default}'. Call fastlora.warmup(...) with the layer's shapes, or run "
                    "the model once, before capturing.", stacklevel=4)
                self._warned_capture = True
            return self.impls[self.default], False
        timings = {name: self._time(self.impls[name], args) for name in usable}
        fastest = min(timings, key=timings.__getitem__)
        self.cache.put(device, key, Choice(fastest, timings, unavailable))
        return self.impls[fastest], True

    def _time(self, impl: Impl, args: LinearArgs) -> float:
        run = lambda: impl(args)  # noqa: E731
        if self.timer is not None:
            return float(self.timer(impl.name, run))
        return _cuda_stage_ms(run, args.a.device)

    def describe(self, stage: str, spec: StageSpec, device) -> Explanation:
        """What runs for ``spec`` on ``device`` now, from the cache (times nothing)."""
        device = torch.device(device)
        key = spec.key()
        if spec.quant4:
            return Explanation(stage, key, DEFAULT, "the only implementation for a 4-bit weight",
                               unavailable=dict(QUANT4_UNAVAILABLE))
        forced = self.forced()
        if forced:
            if forced not in spec.impls:
                return Explanation(stage, key, self.default,
                                   f"{IMPL_ENV}={forced} is not a candidate of this stage "
                                   f"({', '.join(spec.impls)}): its default runs")
            return Explanation(stage, key, forced, f"forced by {IMPL_ENV}")
        if not self._times(device):
            return Explanation(stage, key, self.default, f"not timed on {device.type}")
        choice = self.cache.get(device_name(device), key)
        if choice is None:
            return Explanation(stage, key, self.default,
                               "not measured yet: the first call outside CUDA-graph capture, or "
                               "fastlora.warmup, times the candidates")
        return Explanation(stage, key, choice.impl, "measured", dict(choice.timings_ms),
                           dict(choice.unavailable))


CHOOSER = Chooser()


def linear(impls: tuple[str, ...], a: torch.Tensor, b: torch.Tensor,
           low: kernels.Term | None = None, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, *, g_out: torch.Tensor | None = None,
           g_in: torch.Tensor | None = None) -> torch.Tensor:
    """``kernels.fused_linear``'s result from the one of ``impls`` (a stage's candidates:
    ``FORWARD``, ``LORA_DX``, ``DORA_DX``) that ``CHOOSER`` picks for this call; for a
    4-bit b (``kernels.Quant4``) from the fused kernel, its only implementation."""
    if isinstance(b, kernels.Quant4):
        return IMPLS[DEFAULT].launch(a, b, low, bias, out_dtype, g_out=g_out, g_in=g_in)
    return CHOOSER.run(impls, a, b, low, bias, out_dtype, g_out, g_in)


def layer_stages(m: int, k: int, n: int, r: int, *, dtype: torch.dtype,
                 adapter_dtype: torch.dtype, bias: bool, dropout: bool, dora: bool,
                 training: bool, quant4: bool = False) -> dict[str, StageSpec]:
    """The linear-stage calls one ``lora_linear``/``dora_linear`` call makes (x ``[m, k]``,
    weight ``[n, k]`` row-major, or 4-bit with ``quant4``, rank r), as ``fastlora.ops.library``
    makes them: "forward" (a = x, b = W^T, lb = B^T, the bias, DoRA's g on the output) and,
    in training, "dx" (a = dY, b = W, lb = A, dropout's keep-mask, DoRA's g on dY). DoRA
    with dropout in training runs the PyTorch reference: no stage. Rows are 16-byte
    aligned when their byte lengths are (fresh tensors start on such boundaries)."""
    if dora and dropout and training:
        return {}
    size = torch.empty((), dtype=dtype).element_size()
    k_rows, n_rows = (k * size) % 16 == 0, (n * size) % 16 == 0
    stages = {"forward": StageSpec(m, n, k, r, dtype, adapter_dtype, dtype, aligned=k_rows,
                                   bias=bias, g_out=dora, impls=QUANT4 if quant4 else FORWARD,
                                   quant4=quant4)}
    if training:
        dx = QUANT4 if quant4 else DORA_DX if dora else LORA_DX
        stages["dx"] = StageSpec(m, k, n, r, dtype, adapter_dtype, dtype, b_nk=False,
                                 aligned=k_rows and n_rows, dropout=dropout, g_in=dora,
                                 impls=dx, quant4=quant4)
    return stages
