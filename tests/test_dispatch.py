"""The implementation chooser with injected timings: it picks the fastest of a stage's
candidates, caches the choice in memory and on disk, honours FASTLORA_IMPL, never re-times
a cached key (a settled key is one dictionary lookup) and never times while a CUDA graph is
being captured; explain and warmup report what it chose."""
import json
import warnings

import pytest
import torch

import fastlora
from data import generator, randn
from fastlora.choice import dispatch
from fastlora.choice.store import ChoiceCache
from fastlora.choice.dispatch import DORA_DX, FORWARD, Chooser, Impl, LinearArgs, StageSpec
from fastlora.kernels import term, tma_layout_unsupported
from helpers import assert_close


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTLORA_IMPL", raising=False)
    return tmp_path / "cache"


class FakeTimer:
    """Median times by implementation name; counts the timings it was asked for."""

    def __init__(self, **ms):
        self.ms = ms
        self.calls = []

    def __call__(self, name, fn):
        self.calls.append(name)
        return self.ms[name]


def fake_impls(unsupported=None):
    """Three launchers that return their own name, ``unsupported``: name -> reason."""
    unsupported = unsupported or {}
    return {name: Impl(name, lambda *a, _n=name, **k: _n,
                       lambda args, _n=name: unsupported.get(_n))
            for name in ("fused", "cublas", "tma")}


def call(m=40, k=64, n=32, r=8, dtype=torch.float16, device="cpu", **flags):
    """Linear-stage arguments of the forward form (b = W^T)."""
    g = generator(m)
    w = randn(n, k, g=g, device=device, dtype=dtype)
    lb = randn(n, r, g=g, device=device, dtype=dtype).t()
    low = term(randn(m, r, g=g, device=device), lb, 1.0)
    return LinearArgs(randn(m, k, g=g, device=device, dtype=dtype), w.t(), low, **flags)


def chooser(timer, **kw):
    return Chooser(fake_impls(kw.pop("unsupported", None)), ChoiceCache(), timer, **kw)


def test_picks_the_fastest_and_times_each_candidate_once():
    timer = FakeTimer(fused=3.0, cublas=1.0, tma=2.0)
    assert chooser(timer).choose(call()).name == "cublas"
    assert sorted(timer.calls) == ["cublas", "fused", "tma"]


def test_never_retimes_a_cached_key_but_times_a_new_one():
    timer = FakeTimer(fused=1.0, cublas=2.0, tma=3.0)
    c = chooser(timer)
    assert c.choose(call(m=40)).name == "fused"
    assert c.choose(call(m=40)).name == "fused"
    assert c.choose(call(m=60)).name == "fused"  # same M bucket (64): same key
    assert len(timer.calls) == 3
    c.choose(call(m=65))  # next bucket
    c.choose(call(m=40, dtype=torch.float32))  # another dtype
    c.choose(call(m=40, bias=torch.zeros(32, dtype=torch.float16)))  # another flag
    assert len(timer.calls) == 12


def test_choice_persists_on_disk_per_device_and_versions(cache_dir):
    c = chooser(FakeTimer(fused=3.0, cublas=1.0, tma=2.0))
    c.choose(call())
    files = list(cache_dir.glob("*.json"))
    assert len(files) == 1
    name = files[0].name
    assert name.startswith("cpu--fastlora-") and "torch-" in name and "triton-" in name
    data = json.loads(files[0].read_text())
    key = StageSpec.of(call()).key()
    assert data["choices"][key] == {"impl": "cublas",
                                    "timings_ms": {"fused": 3.0, "cublas": 1.0, "tma": 2.0},
                                    "unavailable": {}}
    # a new process (fresh memory) reads the file and times nothing
    timer = FakeTimer(fused=1.0, cublas=9.0, tma=9.0)
    assert chooser(timer).choose(call()).name == "cublas"
    assert timer.calls == []
    assert not list(cache_dir.glob("*.tmp"))


def test_corrupt_file_is_ignored_with_a_warning_and_rewritten(cache_dir):
    path = ChoiceCache().path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    timer = FakeTimer(fused=2.0, cublas=1.0, tma=3.0)
    with pytest.warns(UserWarning, match="unreadable choice cache"):
        assert chooser(timer).choose(call()).name == "cublas"
    assert len(timer.calls) == 3
    assert json.loads(path.read_text())["choices"]


@pytest.mark.parametrize("content", ['{"format": 1, "choices": {"k": {"timings_ms": {}}}}',
                                     '{"format": 99, "choices": {}}', "[]"])
def test_malformed_files_are_ignored(cache_dir, content):
    path = ChoiceCache().path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="unreadable"):
        assert ChoiceCache().get("cpu", "k") is None


def test_unsupported_candidates_are_not_timed_and_say_why():
    timer = FakeTimer(fused=2.0, cublas=1.0, tma=0.5)
    c = chooser(timer, unsupported={"tma": "not sm_90"})
    assert c.choose(call()).name == "cublas"
    assert "tma" not in timer.calls
    choice = c.cache.get("cpu", StageSpec.of(call()).key())
    assert choice.unavailable == {"tma": "not sm_90"}


def test_a_single_candidate_is_not_timed():
    timer = FakeTimer()
    c = chooser(timer, unsupported={"tma": "no", "cublas": "no"})
    assert c.choose(call()).name == "fused"
    assert timer.calls == []


def test_override_forces_one_implementation(monkeypatch):
    timer = FakeTimer(fused=1.0, cublas=2.0, tma=3.0)
    monkeypatch.setenv("FASTLORA_IMPL", "tma")
    assert chooser(timer).choose(call()).name == "tma"
    monkeypatch.setenv("FASTLORA_IMPL", "CUBLAS")
    assert chooser(timer).choose(call()).name == "cublas"
    assert timer.calls == []


def test_override_errors_name_the_problem(monkeypatch):
    c = chooser(FakeTimer(), unsupported={"tma": "the TMA kernel is built for sm_90"})
    monkeypatch.setenv("FASTLORA_IMPL", "cutlass")
    with pytest.raises(ValueError, match="'cutlass': expected one of fused, cublas, tma"):
        c.choose(call())
    monkeypatch.setenv("FASTLORA_IMPL", "tma")
    with pytest.raises(RuntimeError, match="FASTLORA_IMPL=tma cannot run this call: .*sm_90"):
        c.choose(call())


def test_never_times_under_capture_default_then_cached_choice():
    timer = FakeTimer(fused=3.0, cublas=1.0, tma=2.0)
    capturing = [True]
    c = chooser(timer, capturing=lambda: capturing[0])
    with pytest.warns(UserWarning, match="CUDA graph is being captured.*'fused'.*warmup"):
        assert c.choose(call()).name == "fused"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert c.choose(call(m=200)).name == "fused"
    assert timer.calls == []
    capturing[0] = False
    assert c.choose(call()).name == "cublas"  # measured once outside capture
    capturing[0] = True
    assert c.choose(call()).name == "cublas"
    assert len(timer.calls) == 3


def test_an_unaligned_call_is_its_own_key():
    """TMA needs 16-byte aligned rows: a call whose rows are not (here a view one element
    into its storage) has its own key, where TMA is no candidate."""
    timer = FakeTimer(fused=3.0, cublas=2.0, tma=1.0)
    impls = fake_impls()
    impls["tma"] = Impl("tma", impls["tma"].launch,
                        lambda args: tma_layout_unsupported(args.a, args.b))
    c = Chooser(impls, ChoiceCache(), timer)
    aligned = call()
    storage = randn(40 * 64 + 1, g=generator(5), dtype=torch.float16)
    shifted = LinearArgs(storage[1:].view(40, 64), aligned.b, aligned.low)
    assert c.choose(shifted).name == "cublas"
    assert c.choose(aligned).name == "tma"
    assert timer.calls == ["fused", "cublas", "fused", "cublas", "tma"]
    assert StageSpec.of(shifted).key() == StageSpec.of(aligned).key() + " +unaligned"
    choice = c.cache.get("cpu", StageSpec.of(shifted).key())
    assert "16-byte" in choice.unavailable["tma"]


def test_a_stage_times_only_its_candidates():
    """DoRA's dx (g_in) has no cuBLAS form: its stage never times or runs cuBLAS."""
    timer = FakeTimer(fused=3.0, cublas=1.0, tma=2.0)
    c = chooser(timer)
    args = call(g_in=torch.ones(64))
    assert c.choose(args, DORA_DX).name == "tma"
    assert timer.calls == ["fused", "tma"]


def test_forced_implementation_outside_a_stage_runs_its_default(monkeypatch):
    monkeypatch.setenv("FASTLORA_IMPL", "cublas")
    c = chooser(FakeTimer())
    assert c.choose(call(g_in=torch.ones(64)), DORA_DX).name == "fused"
    spec = StageSpec.of(call(g_in=torch.ones(64)), DORA_DX)
    e = c.describe("dx", spec, "cpu")
    assert e.impl == "fused" and "FASTLORA_IMPL=cublas is not a candidate" in e.why


def test_a_settled_key_is_a_lookup(monkeypatch):
    """After a key's first call nothing is measured, checked or formatted again: the call
    key (a tuple) finds the choice; FASTLORA_IMPL is part of it."""
    timer = FakeTimer(fused=3.0, cublas=1.0, tma=2.0)
    c = chooser(timer)
    args = call()
    assert c.run(FORWARD, args.a, args.b, args.low) == "cublas"

    def fail(*a, **k):
        raise AssertionError("slow path taken for a settled key")

    monkeypatch.setattr(StageSpec, "of", fail)
    monkeypatch.setattr(c, "_choose", fail)
    for m in (40, 33, 64):  # one M bucket
        again = call(m=m)
        assert c.run(FORWARD, again.a, again.b, again.low) == "cublas"
    assert len(timer.calls) == 3
    monkeypatch.setenv("FASTLORA_IMPL", "tma")
    with pytest.raises(AssertionError, match="slow path"):
        c.run(FORWARD, args.a, args.b, args.low)


def test_cpu_without_a_timer_runs_the_default_and_writes_nothing(cache_dir):
    c = Chooser(fake_impls(), ChoiceCache())
    assert c.choose(call()).name == "fused"
    assert not cache_dir.exists()


@pytest.mark.parametrize("fastest", ["fused", "cublas", "tma"])
def test_real_impls_run_through_the_chooser(fastest, device):
    """Each real launcher, picked by the chooser (after running in its timing), gives the
    reference result."""
    args = call(m=37, k=72, n=40, dtype=torch.float32, device=device,
                bias=randn(40, g=generator(1), device=device))
    low = args.low
    ref = (args.a.double() @ args.b.double() + low.l.ptr.double() @ low.lb.ptr.double()
           + args.bias.double())
    timer = FakeTimer(**{n: (0.5 if n == fastest else 1.0) for n in dispatch.IMPLS})
    runs = []
    def timer_that_runs(name, fn):
        runs.append(fn())
        return timer(name, fn)

    c = Chooser(dispatch.IMPLS, ChoiceCache(), timer_that_runs)
    impl = c.choose(args)
    assert impl.name == fastest and len(runs) == 3
    assert_close(impl(args), ref, torch.float32, fastest)


@pytest.fixture
def timed_chooser(monkeypatch):
    timer = FakeTimer(fused=2.0, cublas=1.0, tma=3.0)
    c = Chooser(dispatch.IMPLS, ChoiceCache(), timer)
    monkeypatch.setattr(dispatch, "CHOOSER", c)
    return c, timer


def test_explain_before_and_after_warmup(timed_chooser, device):
    c, timer = timed_chooser
    shape = dict(x_shape=(2, 5, 32), weight_shape=(48, 32), rank=4, dtype=torch.float32,
                 dropout_p=0.1, device=device)
    before = fastlora.explain(**shape)
    assert [e.stage for e in before] == ["forward", "dx"]
    assert all(e.impl == "fused" and "not measured yet" in e.why for e in before)
    after = fastlora.warmup(**shape)
    assert len(timer.calls) == 6  # three candidates, two stages
    for e in after:
        assert e.impl == "cublas" and e.why == "measured"
        assert e.timings_ms == {"fused": 2.0, "cublas": 1.0, "tma": 3.0}
        assert "cublas (measured: fused 2 ms, cublas 1 ms, tma 3 ms)" in str(e)
    assert "m16 n48 k32 r4 float32/float32->float32 a:rows b:nk +bias" == after[0].key
    assert "m16 n32 k48 r4 float32/float32->float32 a:rows b:kn +dropout" == after[1].key
    fastlora.warmup(**shape)
    assert len(timer.calls) == 6


def test_explain_dora_and_inference(timed_chooser, device):
    out = fastlora.explain((7, 32), (48, 32), 4, dtype=torch.float32, dora=True, device=device)
    assert [e.key.split()[-1] for e in out] == ["+g_out", "+g_in"]
    assert [e.stage for e in fastlora.explain((7, 32), (48, 32), 4, training=False,
                                              device=device)] == ["forward"]
    with pytest.raises(ValueError, match="x has 31 features"):
        fastlora.explain((7, 31), (48, 32), 4, device=device)


def test_warmup_times_each_stage_s_candidates(timed_chooser, device):
    """DoRA in training: the forward times three candidates, the dx pass fused and TMA."""
    c, timer = timed_chooser
    out = fastlora.warmup((7, 32), (48, 32), 4, dtype=torch.float32, dora=True, device=device)
    assert timer.calls == ["fused", "cublas", "tma", "fused", "tma"]
    assert [(e.impl, list(e.timings_ms)) for e in out] == [
        ("cublas", ["fused", "cublas", "tma"]), ("fused", ["fused", "tma"])]


def test_explain_reports_override_and_cpu(monkeypatch):
    monkeypatch.setenv("FASTLORA_IMPL", "cublas")
    assert all(e.impl == "cublas" and "FASTLORA_IMPL" in e.why
               for e in fastlora.explain((7, 32), (48, 32), 4, device="cpu"))
    monkeypatch.delenv("FASTLORA_IMPL")
    assert all(e.impl == "fused" and e.why == "not timed on cpu"
               for e in fastlora.explain((7, 32), (48, 32), 4, device="cpu"))


def test_explain_4bit_weight_is_fused_only(monkeypatch):
    """A bitsandbytes 4-bit weight: the fused kernel, for the forward and the dx pass, with
    the reason the others cannot run; FASTLORA_IMPL does not apply."""
    monkeypatch.setenv("FASTLORA_IMPL", "cublas")
    out = fastlora.explain((7, 64), (48, 64), 4, dtype=torch.float16, quant4=True, device="cpu")
    assert [(e.stage, e.impl, e.key.split()[-1]) for e in out] == [
        ("forward", "fused", "+quant4"), ("dx", "fused", "+quant4")]
    assert all(e.why == "the only implementation for a 4-bit weight" for e in out)
    assert all("cuBLAS multiplies 16/32-bit matrices" in e.unavailable["cublas"]
               and "tma" in e.unavailable for e in out)
    assert "not run: cublas: a 4-bit weight" in str(out[0])


@pytest.mark.gpu
@pytest.mark.gpu_smoke
def test_gpu_first_call_times_on_cuda_then_capture_replays(cache_dir):
    """Real CUDA-event timing picks one of the candidates and writes the file; a later
    capture of the same key times nothing and replays the chosen kernel."""
    c = Chooser(dispatch.IMPLS, ChoiceCache())
    args = call(m=2048, k=4096, n=4096, r=16, dtype=torch.bfloat16, device="cuda")
    impl = c.choose(args)
    choice = c.cache.get(dispatch.device_name("cuda"), StageSpec.of(args).key())
    assert impl.name == choice.impl and len(choice.timings_ms) >= 2
    ref = impl(args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = c.choose(args)(args)
    graph.replay()
    torch.testing.assert_close(out, ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_explain_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="no CUDA device is available: pass device='cpu'"):
        fastlora.explain((4, 64), (32, 64), 8)
