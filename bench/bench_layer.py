"""Layer benchmark: fastlora.lora_linear vs cuBLAS F.linear alone vs eager LoRA vs PEFT.

Times forward, backward and forward+backward with ``triton.testing.do_bench`` (medians,
after warm-up so autotuning is not timed), and reports peak memory and the bytes each
implementation saves for backward. Writes ``layer-<gpu>-<date>.json`` and ``.md``.

    python bench/bench_layer.py [--quick] [--out bench/results]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_bytes, print_row, saved_bytes, write_results  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
MS = [1, 16, 128, 2048, 8192]
RANKS = [8, 16, 64, 128]
DROPOUTS = [0.0, 0.1]


def make_impls(k, n, r, p, dtype, adapter_dtype, device="cuda"):
    """name -> (forward fn of x, trainable params): one shared base layer and adapter."""
    import fastlora
    from peft import LoraConfig, get_peft_model

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


def measure(fn, params, x, dy):
    from triton.testing import do_bench

    grads = [x, *params]
    with torch.no_grad():
        fwd = do_bench(lambda: fn(x), return_mode="median")
    y = fn(x)
    bwd = do_bench(lambda: y.backward(dy, retain_graph=True), grad_to_none=grads,
                   return_mode="median")
    y = None  # free the graph before the next measurements
    both = do_bench(lambda: fn(x).backward(dy), grad_to_none=grads, return_mode="median")
    peak = peak_bytes(lambda: fn(x).backward(dy))
    saved = saved_bytes(lambda: fn(x))
    return dict(fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both, peak_mb=peak / 2**20,
                saved_mb=saved / 2**20)


def compare(impls, m, k, n, refs, **fields) -> list[dict]:
    """Measure every implementation on one [m, k] bf16 input; one row each, with the time
    ratios to each of ``refs`` measured in the same run."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    results = {name: measure(fn, params, x, dy) for name, (fn, params) in impls.items()}
    rows = []
    for name, res in results.items():
        row = dict(K=k, N=n, M=m, **fields, impl=name, **res)
        for ref in refs:
            row[f"fwd/{ref}"] = res["fwd_ms"] / results[ref]["fwd_ms"]
            row[f"fwd_bwd/{ref}"] = res["fwd_bwd_ms"] / results[ref]["fwd_bwd_ms"]
        rows.append(row)
        print_row(row)
    return rows


def run(shapes, ms, ranks, dropouts, adapter_dtype):
    rows = []
    for (k, n), m, r, p in itertools.product(shapes, ms, ranks, dropouts):
        impls = make_impls(k, n, r, p, torch.bfloat16, adapter_dtype)
        rows += compare(impls, m, k, n, ("F.linear", "eager", "peft"), r=r, p=p,
                        adapter=str(adapter_dtype).split(".")[-1])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true",
                        help="K=N=4096, r=16, M in {16, 2048, 8192} only")
    parser.add_argument("--adapter-dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_layer: needs a CUDA GPU; nothing measured.")
        return 0
    adapter_dtype = torch.bfloat16 if args.adapter_dtype == "bf16" else torch.float32
    if args.quick:
        rows = run([(4096, 4096)], [16, 2048, 8192], [16], DROPOUTS, adapter_dtype)
    else:
        rows = run(SHAPES, MS, RANKS, DROPOUTS, adapter_dtype)
    columns = ["K", "N", "M", "r", "p", "adapter", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
               "fwd/F.linear", "fwd/eager", "fwd/peft", "fwd_bwd/F.linear", "fwd_bwd/peft",
               "peak_mb", "saved_mb"]
    preamble = ("Times are medians of triton.testing.do_bench (ms); ratios are time / reference "
                "time in the same run (below 1 is faster). saved_mb: bytes autograd keeps for "
                "backward (fastlora: x and T = drop(x) A^T in fp32, never the dropout mask).")
    write_results(args.out, f"layer-{args.adapter_dtype}", environment(), rows, columns, preamble)
    return 0


if __name__ == "__main__":
    sys.exit(main())
