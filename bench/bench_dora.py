"""DoRA benchmark: fastlora.dora_linear vs PEFT's DoRA layer vs fastlora's own LoRA.

Same method as bench_layer.py (do_bench medians in one run, peak memory, bytes saved for
backward), bf16 base, dropout 0 (PEFT's default; DoRA with dropout in training is not
fused). Writes ``dora-<gpu>-<date>.json``, ``.md`` and ``.png``.

    python bench/bench_dora.py [--quick] [--adapter-dtype bf16 fp32] [--rank 16 64]
                               [--shape K N] [--m M...] [--budget-s S] [--out DIR] [--dry-run]
"""
from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import MS, RANKS, SHAPES, adapter_dtype, compare, grid, grid_parser  # noqa: E402
from common import Results, Run, dtype_name  # noqa: E402

REFS = ("peft-dora", "fastlora-lora")
COLUMNS = ["K", "N", "M", "r", "adapter", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
           "fwd/peft-dora", "fwd/fastlora-lora", "fwd_bwd/peft-dora", "fwd_bwd/fastlora-lora",
           "peak_mb", "saved_mb"]
QUICK = dict(shapes=[(4096, 4096)], ms=[16, 8192], ranks=[16])
PREAMBLE = ("Times are medians of triton.testing.do_bench (ms, warm-up excluded); a ratio is "
            "time / the reference's time in the same run (below 1: faster). Saved for backward "
            "(saved_mb measures it, weights included): fastlora-dora keeps x, T = x A^T "
            "([M, r], fp32), its output and the column factor g ([N]); PEFT's DoRA keeps x, "
            "x A^T, the M x N base output and weight-sized matrices; fastlora-lora (x and T) "
            "is LoRA without the magnitude, the floor for DoRA.")
PLOT = {"x": "M", "impl": "fastlora-dora", "series": ["K", "N"],
        "slice": {"r": 16, "adapter": "bf16"},
        "panels": [["DoRA forward", ["fwd/peft-dora", "fwd/fastlora-lora"]],
                   ["DoRA forward + backward", ["fwd_bwd/peft-dora", "fwd_bwd/fastlora-lora"]]]}


def make_impls(k, n, r, dtype, adapter_dtype, device="cuda", seed=0):
    """name -> (forward fn of x, trainable params) over one base layer and adapter, their
    initialisation seeded by ``seed``."""
    import fastlora
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True)
    peft = get_peft_model(torch.nn.Sequential(base), config).base_model.model[0]
    A, B = peft.lora_A["default"].weight, peft.lora_B["default"].weight
    mag = peft.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        for p in (A, B, mag):
            p.data = p.data.to(adapter_dtype)
        B.normal_(std=0.02)
    s = peft.scaling["default"]
    peft.train()
    return {
        "peft-dora": (peft, [A, B, mag]),
        "fastlora-lora": (lambda x: fastlora.lora_linear(x, base.weight, None, A, B, s), [A, B]),
        "fastlora-dora": (lambda x: fastlora.dora_linear(x, base.weight, None, A, B, s, mag),
                          [A, B, mag]),
    }


def main(argv=None) -> int:
    args = grid_parser(__doc__, QUICK).parse_args(argv)
    run = Run.start("bench_dora.py", args)
    g = grid(run, args, dict(shapes=SHAPES, ms=MS, ranks=RANKS), QUICK)
    results = Results(run, args.out, "dora", "dora", COLUMNS, PREAMBLE, PLOT)

    @functools.lru_cache(maxsize=1)  # one layer at a time, rebuilt when the point changes
    def impls(r, dtype, k, n):
        return make_impls(k, n, r, run.half, dtype, device=run.device)

    points = itertools.product(g["ranks"], args.adapter_dtype, g["shapes"], g["ms"])
    for r, adapter, (k, n), m in results.budgeted(list(points)):
        dtype = adapter_dtype(run, adapter)
        results.add(compare(run, impls(r, dtype, k, n), m, k, n, REFS, r=r,
                            adapter=dtype_name(dtype)))
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
