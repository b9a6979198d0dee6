"""Multi-adapter benchmark: fastlora.multi_lora_linear vs PEFT's mixed batch, a per-adapter
loop of fastlora.lora_linear, cuBLAS F.linear alone, and the memory-traffic bound.

Forward of one layer (bf16, K = N = 4096 by default) on batches whose rows use 1, 8, 32 or
128 distinct adapters, assigned uniformly, skewed (80% of rows on one adapter) or one per
row (row i -> adapter i mod n), ranks 16 or mixed 8..64; decode (M = 1..256) and prefill
(M up to 8192). The bound is ``bytes(W + adapters used + x + y) / copy bandwidth``, the
bandwidth measured in the same run by a large device-to-device copy. Times are
``triton.testing.do_bench`` medians after warm-up (autotuning is never timed);
``fastlora-graph`` replays the same call from a CUDA graph (the op has no host sync and
static grids), which removes the launch overhead that dominates decode shapes. The
per-adapter loop gets its row groups precomputed (outside the timing). Writes
``multi-<gpu>-<date>.json`` and ``.md``; without CUDA it says so and exits 0.

    python bench/bench_multi.py [--quick] [--out bench/results]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_row, write_results  # noqa: E402

DECODE_MS = [1, 16, 64, 256]
PREFILL_MS = [1024, 8192]
ADAPTERS = [1, 8, 32, 128]
ASSIGNMENTS = ["uniform", "skewed", "distinct"]
RANKS = {"16": [16], "mixed": [8, 16, 32, 64]}


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

    from fastlora.multi import pack_adapters

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
    the bytes the layer must move (W, the adapters present, x, y)."""
    from fastlora import lora_linear
    from fastlora.multi import multi_lora_linear

    weight = layer.base_layer.weight
    n_out, k = weight.shape
    device, dtype = weight.device, weight.dtype
    index_dev = index.to(device)
    row_names = [f"a{i}" for i in index.tolist()]
    groups = [(f"a{i}", (index == i).nonzero().squeeze(1).to(device)) for i in index.unique().tolist()]

    def loop(x):
        y = torch.empty((x.shape[0], n_out), device=device, dtype=dtype)
        for a, rows in groups:
            y.index_copy_(0, rows, lora_linear(x[rows], weight, None, layer.lora_A[a].weight,
                                               layer.lora_B[a].weight, layer.scaling[a]))
        return y

    elem = torch.finfo(dtype).bits // 8
    adapter_bytes = sum(layer.lora_A[a].weight.shape[0] * (k + n_out) * elem for a, _ in groups)
    bytes_moved = (n_out * k + index.numel() * (k + n_out)) * elem + adapter_bytes
    impls = {
        "F.linear": lambda x: F.linear(x, weight),
        "peft-mixed": lambda x: layer._mixed_batch_forward(x, adapter_names=row_names),
        "loop": loop,
        "fastlora": lambda x: multi_lora_linear(x, weight, None, bank, index_dev),
    }
    return impls, bytes_moved


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), from a 1 GiB copy."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def run(shapes, ms, adapter_counts, assignments, rank_sets, bandwidth):
    rows = []
    g = torch.Generator().manual_seed(0)
    for (k, n_out), n, rank_name in itertools.product(shapes, adapter_counts, rank_sets):
        ranks = [RANKS[rank_name][i % len(RANKS[rank_name])] for i in range(n)]
        layer, bank = make_layer(k, n_out, ranks, torch.bfloat16)
        for m, kind in itertools.product(ms, assignments):
            rows += measure(layer, bank, assign(kind, m, n, g), kind, rank_name, bandwidth)
    return rows


def measure(layer, bank, index, kind, rank_name, bandwidth) -> list[dict]:
    """One batch composition: every implementation's time, and ratios."""
    from triton.testing import do_bench, do_bench_cudagraph

    impls, bytes_moved = make_impls(layer, bank, index)
    n_out, k = layer.base_layer.weight.shape
    x = torch.randn(index.numel(), k, device="cuda", dtype=torch.bfloat16)
    times = {}
    with torch.no_grad():
        for name, fn in impls.items():
            fn(x)  # warm-up: autotuning, caches
            times[name] = do_bench(lambda fn=fn: fn(x), return_mode="median")
        times["fastlora-graph"] = do_bench_cudagraph(lambda: impls["fastlora"](x),
                                                     return_mode="median")
    bound = bytes_moved / bandwidth * 1e3
    rows = []
    for name, ms in times.items():
        row = dict(K=k, N=n_out, M=index.numel(), adapters=bank.n, present=len(index.unique()),
                   assignment=kind, ranks=rank_name, impl=name, ms=ms, bound_ms=bound,
                   **{"bound/time": bound / ms, "time/F.linear": ms / times["F.linear"],
                      "time/peft": ms / times["peft-mixed"], "time/loop": ms / times["loop"]})
        rows.append(row)
        print_row(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true",
                        help="M in {16, 2048}, 8 and 128 adapters, uniform and distinct, rank 16")
    parser.add_argument("--shape", type=int, nargs=2, action="append", metavar=("K", "N"),
                        help="layer shape (repeatable; default 4096 4096)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_multi: needs a CUDA GPU; nothing measured.")
        return 0
    shapes = [tuple(s) for s in args.shape] if args.shape else [(4096, 4096)]
    bandwidth = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    if args.quick:
        rows = run(shapes, [16, 2048], [8, 128], ["uniform", "distinct"], ["16"], bandwidth)
    else:
        rows = run(shapes, DECODE_MS + PREFILL_MS, ADAPTERS, ASSIGNMENTS, list(RANKS), bandwidth)
    env = environment() | {"copy_GBps": bandwidth / 1e9}
    columns = ["K", "N", "M", "adapters", "present", "assignment", "ranks", "impl", "ms",
               "bound_ms", "bound/time", "time/F.linear", "time/peft", "time/loop"]
    preamble = ("Forward of one bf16 layer with a different adapter per row. Times: medians of "
                "triton.testing.do_bench (ms); fastlora-graph: the same call replayed from a CUDA "
                "graph. bound_ms: bytes of W + the adapters present + x + y at the measured "
                f"copy bandwidth ({bandwidth / 1e9:.0f} GB/s); bound/time near 1 is at the "
                "memory-traffic bound. present: distinct adapters in the batch.")
    write_results(args.out, "multi", env, rows, columns, preamble)
    return 0


if __name__ == "__main__":
    sys.exit(main())
