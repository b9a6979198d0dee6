"""Layer benchmark: fastlora.lora_linear vs cuBLAS F.linear alone vs eager LoRA vs PEFT.

Forward, backward and forward+backward of one bf16 layer, each implementation on the same
input in the same run, timed by ``triton.testing.do_bench`` (medians; one call first, so
autotuning is never timed); peak memory and the bytes each implementation keeps for
backward. Adapters in bf16 or fp32 (PEFT's default over a bf16 model). ``fastlora`` is
the automatic choice of its linear stages' implementation (``fastlora.warmup`` measures it
first; the ``choice`` column and the ``fastlora.explain`` appendix say what was chosen and
why); ``fastlora[fused]``, ``fastlora[cublas]`` and ``fastlora[tma]`` (where the GPU and
shapes allow) force one with ``FASTLORA_IMPL``. Writes ``layer-<gpu>-<date>.json``,
``.md`` and ``.png`` (time ratios against M).

    python bench/bench_layer.py [--quick] [--adapter-dtype bf16 fp32] [--rank 16 64]
                                [--shape K N] [--m M...] [--dropout P...] [--impls NAME...]
                                [--budget-s S] [--out DIR] [--dry-run]
"""
from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Results, Run, dtype_name, forced_impl, parser, relative,  # noqa: E402
                    saved_bytes)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
MS = [1, 16, 128, 2048, 8192]
RANKS = [16, 64, 8, 128]  # the grid's order: r=16 first, so a time budget keeps it
DROPOUTS = [0.0, 0.1]
QUICK = dict(shapes=[(4096, 4096)], ms=[16, 2048, 8192], ranks=[16])
DRY = dict(shapes=[(72, 48)], ms=[1, 19], ranks=[8])  # 16-byte rows: TMA runs (interpreted)
REFS = ("F.linear", "eager", "peft")
CUBLAS = "fastlora[cublas]"  # cuBLAS for the base product, fastlora's pass adds the rest

SAVES = ("Saved for backward (saved_mb measures it, weights included): fastlora keeps x, "
         "T = drop(x) A^T ([M, r], fp32) and the dropout seed, never the mask or a dropped "
         "copy of x; eager and PEFT keep x, the dropout mask and the dropped x (M x K each) "
         "and x A^T; F.linear alone keeps only its frozen weight.")
COLUMNS = ["K", "N", "M", "r", "p", "adapter", "impl", "choice", "fwd_ms", "bwd_ms",
           "fwd_bwd_ms", "fwd/F.linear", "fwd/eager", "fwd/peft", f"fwd/{CUBLAS}",
           "fwd_bwd/F.linear", "fwd_bwd/eager", "fwd_bwd/peft", f"fwd_bwd/{CUBLAS}", "peak_mb",
           "saved_mb"]
PREAMBLE = ("Times are medians of triton.testing.do_bench (ms, L2 flushed before each call, "
            "warm-up excluded); a ratio is time / the reference's time in the same run "
            "(below 1: faster). fastlora: the implementation of each linear stage chosen by "
            "measurement (choice: which, per stage); fastlora[IMPL]: forced by FASTLORA_IMPL=IMPL "
            f"(fused: one Triton GEMM; cublas: cuBLAS then fastlora's in-place pass; tma: the "
            f"sm_90 TMA kernel). /{CUBLAS}: against cuBLAS plus fastlora's epilogue, the "
            "alternative a user can write. " + SAVES)
PLOT = {"x": "M", "impl": "fastlora", "series": ["K", "N"],
        "slice": {"r": 16, "p": 0.1, "adapter": "bf16"},
        "panels": [["forward", ["fwd/F.linear", "fwd/peft", f"fwd/{CUBLAS}"]],
                   ["forward + backward",
                    ["fwd_bwd/F.linear", "fwd_bwd/peft", f"fwd_bwd/{CUBLAS}"]]]}


def make_impls(k, n, r, p, dtype, adapter_dtype, device="cuda", seed=0):
    """name -> (forward fn of x, trainable params): one shared base layer and adapter, their
    initialisation seeded by ``seed``."""
    import fastlora
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"])
    peft = get_peft_model(torch.nn.Sequential(base), config).base_model.model[0]
    A, B = peft.lora_A["default"].weight, peft.lora_B["default"].weight
    with torch.no_grad():
        A.data = A.data.to(adapter_dtype)
        B.data = B.data.to(adapter_dtype).normal_(std=0.02)
    s = peft.scaling["default"]
    peft.train()

    def eager(x):
        lora = F.linear(F.linear(F.dropout(x.to(A.dtype), p, True), A), B) * s
        return (F.linear(x, base.weight) + lora).to(x.dtype)

    return {
        "F.linear": (lambda x: F.linear(x, base.weight), []),
        "eager": (eager, [A, B]),
        "peft": (peft, [A, B]),
        "fastlora": (lambda x: fastlora.lora_linear(x, base.weight, None, A, B, s, dropout_p=p,
                                                    training=True), [A, B]),
    }


def measure(run: Run, fn, params, x, dy) -> dict:
    """Forward, backward, forward+backward times, peak memory and saved bytes of ``fn``."""
    grads = [x, *params]
    with torch.no_grad():
        fwd = run.time_ms(lambda: fn(x))
    y = fn(x)
    bwd = run.time_ms(lambda: y.backward(dy, retain_graph=True), grad_to_none=grads)
    y = None  # free the graph before the next measurements
    both = run.time_ms(lambda: fn(x).backward(dy), grad_to_none=grads)
    for t in grads:
        t.grad = None
    peak = run.peak_bytes(lambda: fn(x).backward(dy))
    saved = saved_bytes(lambda: fn(x))
    return dict(fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both,
                peak_mb=None if peak is None else peak / 2**20, saved_mb=saved / 2**20)


def compare(run: Run, impls, m, k, n, refs, **fields) -> list[dict]:
    """Every implementation on one seeded ``[m, k]`` input: one row each, with the time
    ratios to each of ``refs`` measured in the same run. ``impls``: name -> (fn, params) or
    (fn, params, FASTLORA_IMPL value forced while it is measured)."""
    x = run.randn(m, k, seed=m, requires_grad=True)
    dy = run.randn(m, n, seed=m + 1)
    rows = []
    for name, (fn, params, *forced) in impls.items():
        with forced_impl(*forced or [None]):
            rows.append(dict(K=k, N=n, M=m, **fields, impl=name,
                             **measure(run, fn, params, x, dy)))
    for ref in refs:
        relative(rows, "fwd_ms", ref, f"fwd/{ref}")
        relative(rows, "fwd_bwd_ms", ref, f"fwd_bwd/{ref}")
    return rows


def adapter_dtype(run: Run, name: str) -> torch.dtype:
    """``bf16`` (fp16 in the dry run) or ``fp32``."""
    return torch.float32 if name == "fp32" else run.half


def grid_parser(doc: str, quick: dict):
    """The options of the single-adapter benchmarks: ``--quick`` (the grid ``quick``),
    ``--adapter-dtype``, ``--rank``, ``--shape``, ``--m``."""
    p = parser(doc)
    p.add_argument("--quick", action="store_true",
                   help=", ".join(f"{k}={v}" for k, v in quick.items()) + " only")
    p.add_argument("--adapter-dtype", nargs="+", choices=["bf16", "fp32"], default=["bf16"],
                   help="adapter dtypes measured (default bf16)")
    p.add_argument("--rank", type=int, nargs="+", help=f"ranks (default {RANKS})")
    p.add_argument("--shape", type=int, nargs=2, action="append", metavar=("K", "N"),
                   help=f"layer shape (repeatable; default {SHAPES})")
    p.add_argument("--m", type=int, nargs="+", help="row counts M (default: the grid's)")
    return p


def grid(run: Run, args, full: dict, quick: dict) -> dict:
    """The grid a run measures: tiny in the dry run, else ``quick`` or ``full`` with
    ``--rank``, ``--shape`` and ``--m`` replacing its values."""
    if run.dry_run:
        return DRY
    chosen = dict(quick if args.quick else full)
    chosen["ranks"] = args.rank or chosen["ranks"]
    chosen["shapes"] = [tuple(s) for s in args.shape] if args.shape else chosen["shapes"]
    chosen["ms"] = args.m or chosen["ms"]
    return chosen


IMPLS = ("fastlora", "F.linear", "eager", "peft", "fastlora[fused]", "fastlora[cublas]",
         "fastlora[tma]")


def main(argv=None) -> int:
    p = grid_parser(__doc__, QUICK)
    p.add_argument("--dropout", type=float, nargs="+", default=DROPOUTS,
                   help=f"dropout probabilities (default {DROPOUTS})")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS,
                   help="implementations measured (default all; the ratios to a reference "
                        "left out are empty)")
    args = p.parse_args(argv)
    run = Run.start("bench_layer.py", args)
    g = grid(run, args, dict(shapes=SHAPES, ms=MS, ranks=RANKS), QUICK)
    results = Results(run, args.out, "layer", "layer", COLUMNS, PREAMBLE, PLOT)

    @functools.lru_cache(maxsize=1)  # one layer at a time, rebuilt when the point changes
    def impls(r, dtype, k, n, p):
        return make_impls(k, n, r, p, run.half, dtype, device=run.device)

    points = itertools.product(g["ranks"], args.adapter_dtype, g["shapes"], args.dropout,
                               g["ms"])
    for r, adapter, (k, n), p, m in results.budgeted(list(points)):
        dtype = adapter_dtype(run, adapter)
        layer, explained = with_forced(impls(r, dtype, k, n, p), run, m, k, n, r, p, dtype)
        layer = {name: impl for name, impl in layer.items() if name in args.impls}
        point = dict(r=r, p=p, adapter=dtype_name(dtype))
        refs = [ref for ref in REFS + (CUBLAS,) if ref in layer]
        rows = compare(run, layer, m, k, n, refs, **point)
        for row in rows:
            if row["impl"] == "fastlora":
                row["choice"] = " ".join(f"{e.stage}={e.impl}" for e in explained)
        results.add(rows)
        where = " ".join(f"{c}={v}" for c, v in dict(K=k, N=n, M=m, **point).items())
        results.append("fastlora.explain", [f"{where}: {e}" for e in explained])
    return results.finish()


def with_forced(layer: dict, run: Run, m, k, n, r, p, dtype) -> tuple[dict, list]:
    """``layer`` plus ``fastlora[IMPL]`` for every implementation all of the layer's linear
    stages can run, and ``fastlora.warmup``'s explanations (it chooses the implementations
    first, so the timings below never include choosing)."""
    import fastlora
    from fastlora.choice import dispatch

    explained = fastlora.warmup((m, k), (n, k), r, dtype=run.half, adapter_dtype=dtype,
                                bias=False, dropout_p=p, device=run.device)
    unavailable = {name for e in explained for name in e.unavailable}
    forced = {f"fastlora[{name}]": (*layer["fastlora"], name) for name in dispatch.IMPLS
              if name not in unavailable}
    return {**layer, **forced}, explained


if __name__ == "__main__":
    sys.exit(main())
