"""Compile, before anything is timed, every Triton kernel and autotune config that the
headline benchmarks launch, on all cores at once, into Triton's on-disk cache: a
benchmark's autotuning then loads each config from the cache and only times it.

How: the benchmarks' own fastlora calls (``CALLS``: the layer, DoRA, multi-adapter decode
and 4-bit ones, built by the benchmarks' constructors from the same options the headline
step passes them) run once with every kernel launch recorded instead of run (``trace``),
every linear-stage implementation the chooser can pick included. Each launch gives one job
per autotune config its autotuner would try (pruned as at run time), deduplicated by
Triton's own cache key; worker processes (``--jobs``, default one per core) trace the same
calls and compile their share with ``JITFunction.warmup``, the JIT's own path, so each
compilation lands under the key the benchmark's launch looks up. A last check compiles
a few jobs again in this process: from the cache they take milliseconds.

Check-kernels' jobs (``fastlora.kernels.aot``) are not used: they describe each kernel for
review (types, divisibility) but not with the exact specialization of a launch (which
integer arguments are 1 or multiples of 16, which pointers are None), so their cache keys
differ from the launches'.

``--dry-run``: the same on a CPU with tiny shapes, compiled for sm_90 (a stand-in for the
CUDA driver reports that target), ``--limit`` jobs only. Never uses Triton's interpreter.

    python bench/tools/precompile.py [--benchmarks layer dora multi qlora] [--shape K N] [--m M...]
                                     [--rank R] [--dropout P...] [--jobs N] [--limit N] [--dry-run]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiles: never the interpreter (nor its configs)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: see tools/__init__.py

BENCHMARKS = ("layer", "dora", "multi", "qlora")
DRY_TARGET = 90  # the dry run compiles for sm_90


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                   help="whose calls to compile (default all)")
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("K", "N"),
                   help="layer shape (default 4096 4096)")
    p.add_argument("--m", type=int, nargs="+", default=[16, 8192],
                   help="row counts of the layer, DoRA and 4-bit calls (default 16 8192)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1],
                   help="dropout probabilities of the layer calls (default 0 0.1)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes")
    p.add_argument("--limit", type=int, default=None, help="compile at most this many jobs")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, compiled for sm_90 (a reduced job with --limit)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the calls


def _fwd_bwd(fn, x):
    def call():
        fn(x).float().sum().backward()
    return call


def _forward(fn, x):
    def call():
        with torch.no_grad():
            fn(x)
    return call


def calls(args) -> list:
    """The headline benchmarks' fastlora calls (no-argument callables), as the benchmarks
    build them: ``bench_layer``'s fastlora (forward + backward, each dropout), ``bench_dora``'s
    DoRA, ``bench_multi``'s decode target (fastlora and the per-adapter loop, inference),
    ``bench_qlora``'s 4-bit and 16-bit fastlora rows."""
    from common import Run

    run = Run("precompile", args.dry_run, None)
    if args.dry_run:
        from bench_layer import DRY

        (k, n), ms, r = DRY["shapes"][0], DRY["ms"], DRY["ranks"][0]
    else:
        (k, n), ms, r = args.shape, args.m, args.rank
    out = []

    def x(m, grad=True):
        return run.randn(m, k, seed=m, requires_grad=grad)

    if "layer" in args.benchmarks:
        from bench_layer import make_impls

        for p in args.dropout:
            fn = make_impls(k, n, r, p, run.half, run.half, device=run.device)["fastlora"][0]
            out += [_fwd_bwd(fn, x(m)) for m in ms]
    if "dora" in args.benchmarks:
        from bench_dora import make_impls

        fn = make_impls(k, n, r, run.half, run.half, device=run.device)["fastlora-dora"][0]
        out += [_fwd_bwd(fn, x(m)) for m in ms]
    if "multi" in args.benchmarks:
        import bench_multi

        (ms_, counts, kinds, rank_sets), = (bench_multi.DRY_DECODE if args.dry_run
                                            else bench_multi.DECODE)
        mk = (64, 48) if args.dry_run else (k, n)
        g = torch.Generator().manual_seed(0)
        for rank_name in rank_sets:
            ranks = bench_multi.RANKS[rank_name]
            ranks = [ranks[i % len(ranks)] for i in range(counts[0])]
            layer, bank = bench_multi.make_layer(*mk, ranks, run.half, device=run.device)
            index = bench_multi.assign(kinds[0], ms_[0], counts[0], g)
            impls, _ = bench_multi.make_impls(layer, bank, index)
            xm = run.randn(ms_[0], mk[0], seed=ms_[0])
            out += [_forward(impls[name], xm) for name in ("fastlora", "loop")]
    if "qlora" in args.benchmarks:
        import bench_qlora

        q = bench_qlora.DRY if args.dry_run else dict(k=k, n=n, r=r, ms=ms)
        impls, _, _ = bench_qlora.make_impls(run, q["k"], q["n"], q["r"])
        for name in ("fastlora-4bit", "fastlora-16bit"):
            out += [_fwd_bwd(impls[name][0], run.randn(m, q["k"], seed=m, requires_grad=True))
                    for m in q["ms"]]
    return out


# ---------------------------------------------------------------- tracing


@dataclass
class Launch:
    """One recorded launch of an autotuned kernel: the autotuner and its arguments."""
    tuner: object
    args: tuple
    kwargs: dict

    def configs(self) -> list:
        """The configs the autotuner would try for this launch (pruned as at run time)."""
        if len(self.tuner.configs) == 1:
            return list(self.tuner.configs)
        self.tuner.nargs = dict(zip(self.tuner.arg_names, self.args))
        try:
            return list(self.tuner.prune_configs(self.kwargs))
        finally:
            self.tuner.nargs = None

    def warmup(self, config):
        """Compile (no launch) this launch with ``config``, as the JIT would."""
        return self.tuner.fn.warmup(*self.args, grid=(1,), **self.kwargs, **config.all_kwargs())


class Sm90Driver:
    """Stands in for the CUDA driver where there is no GPU: the JIT compiles for sm_90."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", DRY_TARGET, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def trace(fns) -> list[Launch]:
    """Every autotuned kernel launch that ``fns`` make on the Triton path (each linear
    stage's every candidate implementation included), recorded, not run: outputs stay
    uninitialized, which changes no launch (nothing is read back)."""
    from triton.runtime.autotuner import Autotuner

    from fastlora.choice import backend, dispatch
    from fastlora.choice.store import ChoiceCache

    launches: list[Launch] = []

    def record(tuner, *args, grid, warmup, **kwargs):
        launches.append(Launch(tuner, args, kwargs))

    def call_once(name, fn) -> float:
        fn()
        return 0.0

    # the chooser "times" each candidate by calling it once, into a scratch choice file
    every = dispatch.Chooser(dispatch.IMPLS, ChoiceCache(), call_once, capturing=lambda: False)
    with tempfile.TemporaryDirectory() as scratch, _env("FASTLORA_CACHE_DIR", scratch), \
            _patched(Autotuner, "run", record), _patched(dispatch, "CHOOSER", every), \
            _patched(backend, "choose", lambda *a, **k: "triton"):
        for fn in fns:
            fn()
    return launches


def jobs(launches: list[Launch]) -> list[tuple[Launch, object]]:
    """(launch, config) pairs to compile, one per distinct Triton cache key, in order."""
    from triton import knobs
    from triton.runtime import jit

    keys = []

    def hook(*, key, **_):
        keys.append(str(key))
        return True  # compile nothing

    pairs, seen = [], set()
    with _patched(knobs.runtime, "jit_cache_hook", hook), \
            _patched(jit, "serialize_specialization_data", _serializable(jit.serialize_specialization_data)):
        for launch in launches:
            for config in launch.configs():
                keys.clear()
                launch.warmup(config)
                key = (launch.tuner.fn.__name__, *keys)
                if key not in seen:
                    seen.add(key)
                    pairs.append((launch, config))
    return pairs


def _serializable(serialize):
    """Triton's ``serialize_specialization_data`` (run before a cache hook), taking a
    ``tl.constexpr`` that wraps a dtype (a descriptor's member, ``Quant4.DTYPE``) by the
    dtype's name: Triton writes a top-level dtype so, but puts a constexpr's value into JSON
    as it is."""
    def wrapped(name, signature, constants, *rest):
        constants = {k: type(v)(str(v.value)) if type(v).__name__ == "constexpr"
                     and type(v.value).__name__ == "dtype" else v for k, v in constants.items()}
        return serialize(name, signature, constants, *rest)
    return wrapped


# ---------------------------------------------------------------- workers


def _use_driver(dry_run: bool) -> None:
    if dry_run:
        from triton.runtime import driver

        driver.set_active(Sm90Driver())


def _worker(task) -> tuple[int, int, list[str]]:
    """Compile jobs ``index, index + workers, ...`` of the first ``limit``: (jobs in all,
    jobs compiled here, failures)."""
    index, workers, args = task
    _use_driver(args.dry_run)
    pairs = jobs(trace(calls(args)))
    failures = []
    mine = pairs[:args.limit][index::workers]
    for launch, config in mine:
        try:
            launch.warmup(config)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
            failures.append(f"{launch.tuner.fn.__name__} {config}: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else ''}")
    return len(pairs), len(mine), failures


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("precompile.py: no CUDA device: nothing was compiled (pass --dry-run for a "
                 "CPU check, which compiles for sm_90)")
    start = time.monotonic()
    workers = max(1, args.jobs)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_worker, [(i, workers, args) for i in range(workers)]))
    total, compiled = done[0][0], sum(n for _, n, _ in done)
    failures = [f for _, _, fs in done for f in fs]
    print(f"precompile: {compiled} of {total} kernel configs compiled in "
          f"{time.monotonic() - start:.0f} s on "
          f"{workers} processes ({'sm_%d, dry run' % DRY_TARGET if args.dry_run else 'this GPU'})"
          f"; {len(failures)} failed", flush=True)
    for failure in failures:
        print(f"  not compiled: {failure}", flush=True)
    # the check: a few jobs compiled again here come from the cache (nothing new in it), as
    # the benchmarks' launches will
    _use_driver(args.dry_run)
    check = jobs(trace(calls(args)))[:min(3, compiled)]
    before = _cache_entries()
    for launch, config in check:
        with contextlib.suppress(Exception):  # (a config that failed above fails again)
            launch.warmup(config)
    new = len(_cache_entries() - before)
    print(f"precompile: {len(check)} jobs compiled again from Triton's cache: {new} new "
          f"cache entries ({'hits' if not new else 'MISSES: the benchmarks will compile again'})",
          flush=True)
    return 1 if new else 0


def _cache_entries() -> set[str]:
    """The entries (one folder per compilation) of Triton's on-disk cache."""
    from triton import knobs

    folder = Path(knobs.cache.dir)
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


if __name__ == "__main__":
    sys.exit(main())
