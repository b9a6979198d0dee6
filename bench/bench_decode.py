"""Decode benchmark: one LoRA layer at decode sizes (a few rows), timed three honest ways.

``do_bench`` flushes the L2 cache before each call, and that flush hides up to ~85 us of
host time per call; a CUDA graph replayed over one weight keeps a 32 MiB weight in a
50 MiB L2 and can beat the DRAM bound it is compared with. Here every implementation
(fastlora, PEFT, eager PyTorch, F.linear alone) runs over enough copies of the layer (base
weight and adapter) to fill the L2 cache three times, one copy after the other:

- ``eager_us``: the calls back to back from the host, no sync between them: what a plain
  ``generate`` sees (host-bound when launches take longer than the GPU work);
- ``graph_us``: the same calls replayed from one CUDA graph: the GPU's own time, weights
  read from DRAM;
- ``bound_us``: the bytes one call must move (W, A, B, x, y; F.linear: W, x, y) at the
  device-to-device copy bandwidth measured in the same run.

Sanity: F.linear's own graph/bound must be at least ~1 (a GEMV cannot beat DRAM); a lower
value means the weights were served from cache and the table says so.

Writes ``decode-<gpu>-<date>.json`` and ``.md``:

    python bench/bench_decode.py [--quick] [--adapter-dtype bf16 fp32] [--rank 16 64]
                                 [--budget-s S] [--out DIR] [--dry-run]
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import SHAPES, adapter_dtype, grid, grid_parser, make_impls  # noqa: E402
from common import Results, Run, check_bound, dtype_name, nbytes, relative, traffic_rows  # noqa: E402

MS = [1, 16]
QUICK = dict(shapes=[(4096, 4096)], ms=[1], ranks=[16])
COLUMNS = ["K", "N", "M", "r", "adapter", "impl", "copies", "eager_us", "graph_us", "bound_us",
           "graph/bound", "eager/bound", "graph/F.linear", "eager/peft", "no_graph"]


def preamble(bandwidth: float) -> str:
    return ("\n\n".join(__doc__.split("\n\n")[1:-2]).replace("``", "`")
            + f"\n\nMeasured copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write). "
            "copies: layer copies rotated through. Inference: no grad, dropout off.")


def main(argv=None) -> int:
    args = grid_parser(__doc__, QUICK).parse_args(argv)
    run = Run.start("bench_decode.py", args)
    g = grid(run, args, dict(shapes=SHAPES, ms=MS, ranks=[16]), QUICK)
    bandwidth = run.copy_bandwidth()
    results = Results(run, args.out, "decode", "decode", COLUMNS, preamble(bandwidth),
                      copy_GBps=bandwidth / 1e9)
    points = itertools.product(g["ranks"], args.adapter_dtype, g["shapes"])
    for r, adapter, (k, n) in results.budgeted(list(points)):
        dtype = adapter_dtype(run, adapter)
        first = make_impls(k, n, r, 0.0, run.half, dtype, device=run.device)
        peft = first["peft"][0]
        weight = nbytes(peft.base_layer.weight)
        adapter_bytes = nbytes(*first["peft"][1])
        copies = [first] + [make_impls(k, n, r, 0.0, run.half, dtype, device=run.device)
                            for _ in range(run.copies(weight + adapter_bytes) - 1)]
        for m in g["ms"]:
            x = run.randn(m, k, seed=m)
            io = nbytes(x) + m * n * x.element_size()
            bound_bytes = {name: weight + io + (0 if name == "F.linear" else adapter_bytes)
                           for name in first}
            rows = traffic_rows(run, [{name: f for name, (f, _) in c.items()} for c in copies],
                                x, bound_bytes, bandwidth)
            relative(rows, "graph_us", "F.linear", "graph/F.linear")
            relative(rows, "eager_us", "peft", "eager/peft")
            results.add([dict(K=k, N=n, M=m, r=r, adapter=dtype_name(dtype), **row)
                         for row in rows])
        del copies, first
    check_bound(results)
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
