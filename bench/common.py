"""Shared benchmark plumbing: where a benchmark runs (a CUDA GPU, or the CPU dry run), how
it times, the memory-traffic bound, and its result files.

Every benchmark script takes ``--out``, ``--dry-run`` and ``--budget-s`` (``parser``),
builds a ``Run`` from them (``Run.start``: without CUDA and without ``--dry-run`` it exits
non-zero, saying nothing was measured), and records rows in a ``Results``. The dry run
uses the CPU, Triton's interpreter, fp16 instead of bf16 (the interpreter's bf16 dots are
broken) and a host clock: it exercises a script end to end and measures nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tables import markdown

RESULTS = Path(__file__).resolve().parent / "results"
DRY_REPS = 1  # host-clock repetitions per timing in the dry run
ROUND_MS = 40.0  # length of one timed round of back-to-back calls on a GPU


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS,
                   help=f"folder for the result files (default {RESULTS})")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, Triton interpreter: checks the script end to end "
                        "and measures nothing (results say so)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new grid point after this many seconds; the results list "
                        "what was left out")
    return p


def llama_options(p: argparse.ArgumentParser, kv_heads: int) -> None:
    """The options of a Llama-style model built from a config (~1B by default); ``--layers``
    comes from the benchmark's preset (``presets``)."""
    p.add_argument("--quick", action="store_true",
                   help="4 layers, a small grid, short timing (not the 1B figures)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, help="default 16 (4 with --quick)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--vocab", type=int, default=32000)


def presets(args: argparse.Namespace, full: dict, quick: dict, dry: dict) -> argparse.Namespace:
    """Options left unset take the run's preset (``--quick``, ``--dry-run``: whose values
    always win, tiny shapes)."""
    preset = dry if args.dry_run else quick if args.quick else full
    for name, value in preset.items():
        if name in dry and args.dry_run or getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def llama(args: argparse.Namespace, device, dtype, positions: int, **config):
    """A ``LlamaForCausalLM`` of ``llama_options``' shape, random weights, on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=positions, **config)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def quantize_linears4(model: torch.nn.Module, compute_dtype: torch.dtype,
                      within: torch.nn.Module | None = None) -> int:
    """Replace every ``nn.Linear`` under ``within`` (default: all of ``model``) by a
    bitsandbytes ``Linear4bit`` quantized from its weight, on that weight's device, as QLoRA
    does: NF4 codes, blocks of 64, the absmax double-quantized, ``compute_dtype`` matmuls.
    Marks ``model`` loaded in 4-bit as transformers does, so that PEFT wraps these layers in
    its bitsandbytes LoRA layer. Returns how many layers were replaced.

    On CPU, bitsandbytes' eval-mode inference repacking is turned off, so the layers keep
    the standard layout (the one PEFT's training and fastlora read). Needs bitsandbytes."""
    import bitsandbytes as bnb

    found = [(parent, name, child) for parent in (within or model).modules()
             for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    for parent, name, linear in found:
        weight = linear.weight.detach()
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                              bias=linear.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64,
                                     compress_statistics=True, quant_type="nf4",
                                     module=q).to(weight.device)
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        if weight.device.type == "cpu":
            q.support_avx512bf16_for_cpu = False
        setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    return len(found)


@dataclass
class Run:
    """Where one benchmark runs: device, 16-bit dtype, timer, time budget."""

    name: str
    dry_run: bool
    budget_s: float | None
    device: torch.device = field(init=False)
    half: torch.dtype = field(init=False)  # bf16 on a GPU; fp16 in the dry run
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        self.device = torch.device("cpu" if self.dry_run else "cuda")
        self.half = torch.float16 if self.dry_run else torch.bfloat16

    @classmethod
    def start(cls, name: str, args: argparse.Namespace) -> Run:
        """The run for parsed ``args``; exits with status 1 when there is nothing to run on."""
        if args.dry_run:
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        elif not torch.cuda.is_available():
            sys.exit(f"{name}: no CUDA device (torch.cuda.is_available() is False): nothing "
                     "was measured. Run it on a GPU, or pass --dry-run for a CPU check of "
                     "the script.")
        torch.manual_seed(0)  # the layers' own initialisation
        return cls(name, args.dry_run, args.budget_s)

    # ------------------------------------------------------------ budget

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.started > self.budget_s

    # ------------------------------------------------------------ data

    def randn(self, *shape, dtype=None, seed: int = 0, requires_grad=False) -> torch.Tensor:
        """Seeded normal data on the run's device (drawn on the CPU, then moved)."""
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(*shape, generator=g).to(self.device, dtype or self.half)
        return t.requires_grad_(requires_grad)

    # ------------------------------------------------------------ timing

    def sync(self) -> None:
        if not self.dry_run:
            torch.cuda.synchronize()

    def time_ms(self, fn, grad_to_none=None, rep_ms: float = 100) -> float:
        """Median ms of ``fn()`` by ``triton.testing.do_bench`` (L2 flushed before each
        call; ``rep_ms`` of repetitions), after a warm-up call so that autotuning and
        compilation are never timed."""
        fn()
        self.sync()
        if self.dry_run:
            return self._host_ms(fn, grad_to_none)
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(25, rep_ms / 4), rep=rep_ms,
                              grad_to_none=grad_to_none, return_mode="median"))

    def back_to_back_ms(self, body) -> float:
        """Median ms of one ``body()`` in rounds of back-to-back calls: no flush and no
        sync between calls, so the host's launch time shows wherever it exceeds the GPU's."""
        body()
        self.sync()
        if self.dry_run:
            return self._host_ms(body)
        once = self._rounds_ms(body, 3)
        rounds = max(3, min(2000, int(ROUND_MS / max(once, 1e-3))))
        return statistics.median(self._rounds_ms(body, rounds) for _ in range(5))

    def decode_ms(self, calls, no_graph: str = "") -> tuple[float, float | None, str]:
        """Per-call ms of ``calls`` (one per weight copy, so consecutive calls read
        different weights from DRAM) two ways: eager, back to back from the host (what a
        plain ``generate`` sees), and replayed from one CUDA graph that holds them all (the
        GPU's own time). Returns (eager, graph or None, why no graph); ``no_graph``: the
        reason not to capture at all. In the dry run the "graph" is the same host-timed
        loop."""
        def body():
            for f in calls:
                f()

        eager = self.back_to_back_ms(body) / len(calls)
        if no_graph:
            return eager, None, no_graph
        if self.dry_run:
            return eager, self._host_ms(body) / len(calls), ""
        try:
            graph = capture(body)
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            torch.cuda.synchronize()
            return eager, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return eager, self.back_to_back_ms(graph.replay) / len(calls), ""

    def _host_ms(self, fn, grad_to_none=None) -> float:
        times = []
        for _ in range(DRY_REPS):
            for t in grad_to_none or ():
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    @staticmethod
    def _rounds_ms(body, rounds: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rounds):
            body()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / rounds

    # ------------------------------------------------------------ memory traffic

    def copy_bandwidth(self) -> float:
        """Device memory bandwidth in bytes/s (read + write) of a large device-to-device
        copy (1 GiB; 16 MiB in the dry run)."""
        src = torch.empty(2**24 if self.dry_run else 2**30, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return 2 * src.numel() / (self.time_ms(lambda: dst.copy_(src)) * 1e-3)

    def copies(self, nbytes: int) -> int:
        """How many copies of ``nbytes`` of weights to rotate through so that each call
        reads its weights from DRAM: together at least three times the L2 cache (2 in the
        dry run)."""
        if self.dry_run:
            return 2
        l2 = torch.cuda.get_device_properties(self.device).L2_cache_size
        return max(2, min(64, math.ceil(3 * l2 / max(nbytes, 1))))

    def peak_bytes(self, fn) -> int | None:
        """Peak device memory above the starting point while ``fn()`` runs (None on CPU)."""
        if self.dry_run:
            fn()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    # ------------------------------------------------------------ description

    def environment(self) -> dict:
        import triton

        env = {"gpu": torch.cuda.get_device_name() if not self.dry_run else None,
               "torch": torch.__version__, "triton": triton.__version__,
               "cuda": torch.version.cuda, "python": sys.version.split()[0],
               "date": datetime.date.today().isoformat(), "dry_run": self.dry_run}
        for package in ("peft", "transformers"):
            try:
                env[package] = __import__(package).__version__
            except ImportError:
                env[package] = None
        return env


def capture(body):
    """A CUDA graph of ``body()``, captured after warm-up calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


@contextlib.contextmanager
def forced_impl(name: str | None):
    """Run the block with ``FASTLORA_IMPL=name`` (unchanged for None): fastlora's linear
    stages, forward and backward, run that implementation (``fastlora.choice.dispatch``)."""
    if name is None:
        yield
        return
    old = os.environ.get("FASTLORA_IMPL")
    os.environ["FASTLORA_IMPL"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTLORA_IMPL"]
        else:
            os.environ["FASTLORA_IMPL"] = old


def saved_bytes(fn) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn()`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Results:
    """One benchmark's result files ``<stem>-<gpu>-<date>.json`` and ``.md``, rewritten
    after every ``add`` (a run cut short keeps what it measured), plus the ``.png`` plot
    (``bench/tools/plot.py``) at ``finish``.

    ``plot``: the plot's specification (see ``plot.py``), or None for no plot.
    """

    def __init__(self, run: Run, out: Path, benchmark: str, stem: str, columns: list[str],
                 preamble: str, plot: dict | None = None, **meta):
        self.run, self.columns, self.preamble = run, columns, preamble
        self.left = 0  # grid points the time budget left out
        self.data = {"benchmark": benchmark, "env": run.environment(), "complete": False,
                     "notes": [], "meta": meta, "columns": columns, "plot": plot, "rows": []}
        env = self.data["env"]
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"] or "cpu-dry-run").strip("-").lower()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{stem}-{gpu}-{env['date']}.json"

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def budgeted(self, points: list):
        """Yield ``points`` while the run's time budget lasts; count the rest as left out."""
        for i, point in enumerate(points):
            if self.run.out_of_time():
                self.left = len(points) - i
                return
            yield point

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            print_row(row)
        self.rows.extend(rows)
        self.save()

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.data["notes"].append(text)
        self.save()

    def append(self, title: str, lines: list[str]) -> None:
        """Add ``lines`` to the appendix ``title`` (verbatim text after the table)."""
        for line in lines:
            print(line, flush=True)
        self.data.setdefault("appendix", {}).setdefault(title, []).extend(lines)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")
        self.path.with_suffix(".md").write_text(markdown(self.data, self.preamble))

    def finish(self) -> int:
        """Mark the run complete (or say how many grid points the budget left out), write
        the files and the plot (none without matplotlib); returns the exit status (0)."""
        if self.left:
            self.note(f"Time budget ({self.run.budget_s:.0f} s) reached: {self.left} grid "
                      "point(s) not measured.")
        self.data["complete"] = not self.left
        self.save()
        written = [self.path, self.path.with_suffix(".md")]
        if self.data["plot"] is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:  # (a GPU image without it: the tables hold every figure)
                print("no plot: matplotlib is not installed", flush=True)
            else:
                from tools.plot import plot_file

                written += plot_file(self.path)
        print("wrote " + ", ".join(str(p) for p in written), flush=True)
        return 0


def traffic_rows(run: Run, copies: list[dict], x, bound_bytes: dict, bandwidth: float,
                 no_graph: dict | None = None) -> list[dict]:
    """Time every implementation over all ``copies`` (each ``{impl: fn of x}`` over its own
    weights) with ``Run.decode_ms``: one row per impl with ``eager_us``, ``graph_us``,
    ``bound_us`` (``bound_bytes[impl]`` at ``bandwidth``) and their ratios. ``no_graph``:
    impl -> why it is not captured (host work in every call)."""
    no_graph = no_graph or {}
    rows = []
    with torch.no_grad():
        for name in copies[0]:
            calls = [lambda f=c[name]: f(x) for c in copies]
            eager, graph, why = run.decode_ms(calls, no_graph.get(name, ""))
            bound = bound_bytes[name] / bandwidth * 1e6
            graph_us = None if graph is None else graph * 1e3
            rows.append({"impl": name, "copies": len(copies), "eager_us": eager * 1e3,
                         "graph_us": graph_us, "bound_us": bound,
                         "graph/bound": graph_us / bound if graph_us else None,
                         "eager/bound": eager * 1e3 / bound, "no_graph": why or None})
    return rows


def check_bound(results: Results, floor: float = 0.9) -> None:
    """The decode tables' sanity line: F.linear's graph-replay time over its own
    memory-traffic bound must be at least ~1 (a GEMV cannot beat DRAM); lower means the
    weights were served from cache, which flatters every graph timing of the table."""
    found = [r["graph/bound"] for r in results.rows
             if r["impl"] == "F.linear" and r.get("graph/bound")]
    if not found:
        results.note("Sanity: no F.linear graph timing, so the bound was not checked.")
        return
    low = min(found)
    results.data["sanity"] = {"flinear_graph_over_bound_min": low, "ok": low >= floor}
    verdict = ("ok" if low >= floor else "FAILED: the weights came from cache, so these graph "
               "timings are too optimistic")
    results.note(f"Sanity: F.linear graph time / its memory-traffic bound is at least "
                 f"{low:.2f} over {len(found)} shapes (expected >= ~1): {verdict}.")


def print_row(row: dict) -> None:
    """One measured row as ``key=value`` pairs, as it is measured."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)


def relative(rows: list[dict], column: str, ref: str, name: str) -> None:
    """Set ``row[name] = row[column] / ref_row[column]`` in the rows of one grid point,
    ``ref_row`` being the row whose impl is ``ref`` (None where a value is missing)."""
    base = next(r[column] for r in rows if r["impl"] == ref)
    for row in rows:
        row[name] = row[column] / base if row.get(column) and base else None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
