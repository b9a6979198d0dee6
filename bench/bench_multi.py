"""Multi-adapter benchmark: fastlora.multi_lora_linear vs PEFT's mixed batch, a per-adapter
loop of fastlora.lora_linear, cuBLAS F.linear alone, and the memory-traffic bound.

Forward of one bf16 layer (K = N = 4096 by default) on batches whose rows use several
adapters, assigned uniformly, skewed (80% of rows on one adapter) or one per row in turn
(``distinct``: row i -> adapter i mod n), rank 16 or mixed ranks 8..64. As in
bench_decode.py, every implementation runs over enough copies of the layer (base weight
and adapters) to fill the L2 cache three times, one copy after the other: ``eager_us``
back to back from the host (what a serving loop without graphs sees), ``graph_us``
replayed from one CUDA graph (the op has no host sync and static grids; PEFT's mixed batch
builds its row lists on the host and is not captured). ``bound_us``: bytes of W + the
adapters present + x + y (F.linear: W + x + y) at the device-to-device copy bandwidth
measured in the same run; F.linear's own graph/bound is the sanity line (>= ~1). The
per-adapter loop gets its row groups precomputed, outside the timing.

Grids: ``--targets`` covers the two goals (64-row decode with 32 distinct adapters; M=8192
prefill with 1 to 128 adapters), ``--decode-only`` the first goal alone; the default is the
full grid; ``--quick`` a small one.

Writes ``multi-<gpu>-<date>.json``, ``.md`` and ``.png``:

    python bench/bench_multi.py [--targets | --decode-only | --quick] [--shape K N]
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
from common import Results, Run, check_bound, nbytes, parser, relative, traffic_rows  # noqa: E402

DECODE_MS = [1, 16, 64, 256]
PREFILL_MS = [1024, 8192]
ADAPTERS = [1, 8, 32, 128]
ASSIGNMENTS = ["uniform", "skewed", "distinct"]
RANKS = {"16": [16], "mixed": [8, 16, 32, 64]}
# Grids: blocks of (Ms, adapter counts, assignments, rank sets).
FULL = [(DECODE_MS + PREFILL_MS, ADAPTERS, ASSIGNMENTS, list(RANKS))]
QUICK = [([16, 2048], [8, 128], ["uniform", "distinct"], ["16"])]
DECODE = [([64], [32], ["distinct"], ["16", "mixed"])]  # decode: 64 rows, 32 adapters
TARGETS = DECODE + [([8192], ADAPTERS, ["uniform", "skewed"], list(RANKS))]  # prefill: 1..128
DRY = [([6], [3], ["distinct"], ["mixed"]), ([37], [1, 4], ["skewed"], ["16"])]
DRY_DECODE = DRY[:1]
NO_GRAPH = {"peft-mixed": "PEFT builds its row lists on the host in every call"}
COLUMNS = ["K", "N", "M", "adapters", "present", "assignment", "ranks", "impl", "copies",
           "eager_us", "graph_us", "bound_us", "graph/bound", "eager/bound", "graph/F.linear",
           "eager/F.linear", "eager/peft", "eager/loop", "no_graph"]
PLOT = {"x": "adapters", "impl": "fastlora", "series": ["M", "assignment", "ranks"],
        "panels": [["fastlora vs F.linear alone", ["graph/F.linear", "eager/F.linear"]],
                   ["fastlora vs PEFT and a per-adapter loop (eager)",
                    ["eager/peft", "eager/loop"]]]}


def assign(kind: str, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Adapter index per row (int32, CPU)."""
    if kind == "uniform":
        return torch.randint(0, n, (m,), generator=g, dtype=torch.int32)
    if kind == "skewed":
        other = torch.randint(0, n, (m,), generator=g, dtype=torch.int32)
        return torch.where(torch.rand(m, generator=g) < 0.8, 0, other).to(torch.int32)
    if kind == "distinct":
        return (torch.arange(m, dtype=torch.int32) % n)[torch.randperm(m, generator=g)]
    raise ValueError(kind)


def make_layer(k, n_out, ranks, dtype, device="cuda", seed=0):
    """A PEFT lora.Linear ``[n_out, k]`` with adapters a0.. of ``ranks`` (non-zero B, the
    base dtype) and the same adapters packed for fastlora."""
    from peft import LoraConfig, get_peft_model

    from fastlora import pack_adapters

    torch.manual_seed(seed)
    base = torch.nn.Linear(k, n_out, bias=False, device=device, dtype=dtype)
    model = None
    for i, r in enumerate(ranks):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
        if model is None:
            model = get_peft_model(torch.nn.Sequential(base), config, adapter_name="a0",
                                   autocast_adapter_dtype=False)
        else:
            model.add_adapter(f"a{i}", config)
    layer = model.base_model.model[0].eval()
    with torch.no_grad():
        for b in layer.lora_B.values():
            b.weight.normal_(std=0.02)
    return layer, pack_adapters([(layer.lora_A[f"a{i}"].weight, layer.lora_B[f"a{i}"].weight,
                                  layer.scaling[f"a{i}"]) for i in range(len(ranks))])


def make_impls(layer, bank, index):
    """name -> forward fn of x for the batch's adapter per row ``index`` ``[M]`` (CPU), and
    name -> the bytes the call must move (W, the adapters present, x, y; F.linear: W, x, y)."""
    from fastlora import lora_linear
    from fastlora import multi_lora_linear

    weight = layer.base_layer.weight
    n_out, k = weight.shape
    device, dtype = weight.device, weight.dtype
    index_dev = index.to(device)
    row_names = [f"a{i}" for i in index.tolist()]
    groups = [(f"a{i}", (index == i).nonzero().squeeze(1).to(device))
              for i in index.unique().tolist()]

    def loop(x):
        y = torch.empty((x.shape[0], n_out), device=device, dtype=dtype)
        for a, rows in groups:
            y.index_copy_(0, rows, lora_linear(x[rows], weight, None, layer.lora_A[a].weight,
                                               layer.lora_B[a].weight, layer.scaling[a]))
        return y

    elem = torch.finfo(dtype).bits // 8
    adapter_bytes = sum(layer.lora_A[a].weight.shape[0] * (k + n_out) * elem for a, _ in groups)
    plain = (n_out * k + index.numel() * (k + n_out)) * elem
    impls = {
        "F.linear": lambda x: F.linear(x, weight),
        "peft-mixed": lambda x: layer._mixed_batch_forward(x, adapter_names=row_names),
        "loop": loop,
        "fastlora": lambda x: multi_lora_linear(x, weight, None, bank, index_dev),
    }
    return impls, {name: plain + (0 if name == "F.linear" else adapter_bytes) for name in impls}


def measure(run: Run, copies: list, index, kind, rank_name, bandwidth) -> list[dict]:
    """One batch composition over every copy of the layer: each implementation's times and
    ratios."""
    built = [make_impls(layer, bank, index) for layer, bank in copies]
    n_out, k = copies[0][0].base_layer.weight.shape
    x = run.randn(index.numel(), k, seed=index.numel())
    rows = traffic_rows(run, [impls for impls, _ in built], x, built[0][1], bandwidth, NO_GRAPH)
    relative(rows, "graph_us", "F.linear", "graph/F.linear")
    for ref, name in (("F.linear", "eager/F.linear"), ("peft-mixed", "eager/peft"),
                      ("loop", "eager/loop")):
        relative(rows, "eager_us", ref, name)
    common = dict(K=k, N=n_out, M=index.numel(), adapters=copies[0][1].n,
                  present=len(index.unique()), assignment=kind, ranks=rank_name)
    return [common | row for row in rows]


def main(argv=None) -> int:
    p = parser(__doc__)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--targets", action="store_true",
                       help="the two goals: M=64 with 32 distinct adapters; M=8192 with 1..128")
    which.add_argument("--decode-only", action="store_true",
                       help="the decode goal alone: M=64 with 32 distinct adapters")
    which.add_argument("--quick", action="store_true",
                       help="M in {16, 2048}, 8 and 128 adapters, uniform and distinct, rank 16")
    p.add_argument("--shape", type=int, nargs=2, action="append", metavar=("K", "N"),
                   help="layer shape (repeatable; default 4096 4096)")
    args = p.parse_args(argv)
    run = Run.start("bench_multi.py", args)
    shapes = ([(64, 48)] if run.dry_run else [tuple(s) for s in args.shape]
              if args.shape else [(4096, 4096)])
    if run.dry_run:
        blocks = DRY_DECODE if args.decode_only else DRY
    else:
        blocks = (TARGETS if args.targets else DECODE if args.decode_only else
                  QUICK if args.quick else FULL)
    bandwidth = run.copy_bandwidth()
    preamble = ("\n\n".join(__doc__.split("\n\n")[1:3]).replace("``", "`")
                + f"\n\nMeasured copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write). "
                "present: distinct adapters in the batch; copies: layer copies rotated through.")
    results = Results(run, args.out, "multi", "multi", COLUMNS, preamble, PLOT,
                      copy_GBps=bandwidth / 1e9)

    @functools.lru_cache(maxsize=1)  # one set of layer copies at a time
    def layers(k, n_out, n, rank_name):
        ranks = [RANKS[rank_name][i % len(RANKS[rank_name])] for i in range(n)]
        first = make_layer(k, n_out, ranks, run.half, device=run.device)
        size = nbytes(first[0].base_layer.weight, first[1].A, first[1].B)
        return [first] + [make_layer(k, n_out, ranks, run.half, device=run.device)
                          for _ in range(run.copies(size) - 1)]

    g = torch.Generator().manual_seed(0)
    points = [(shape, n, rank_name, m, kind)
              for ms, counts, kinds, rank_names in blocks
              for shape, n, rank_name, m, kind in itertools.product(shapes, counts, rank_names,
                                                                     ms, kinds)]
    for (k, n_out), n, rank_name, m, kind in results.budgeted(points):
        results.add(measure(run, layers(k, n_out, n, rank_name), assign(kind, m, n, g), kind,
                            rank_name, bandwidth))
    check_bound(results)
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
