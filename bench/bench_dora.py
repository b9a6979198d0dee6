"""DoRA benchmark: fastlora.dora_linear vs PEFT's DoRA layer vs fastlora's own LoRA.

Same method as bench_layer.py (do_bench medians, peak memory, bytes saved for backward),
bf16 base, dropout 0 (PEFT's default; DoRA with dropout in training is not fused yet).
Writes ``dora-<adapter dtype>-<gpu>-<date>.json`` and ``.md``.

    python bench/bench_dora.py [--quick] [--adapter-dtype bf16|fp32] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import MS, RANKS, SHAPES, compare  # noqa: E402
from common import environment, write_results  # noqa: E402


def make_impls(k, n, r, dtype, adapter_dtype, device="cuda"):
    """name -> (forward fn of x, trainable params) over one base layer and adapter."""
    import fastlora
    from peft import LoraConfig, get_peft_model

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true", help="K=N=4096, r=16, M in {16, 8192}")
    parser.add_argument("--adapter-dtype", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dora: needs a CUDA GPU; nothing measured.")
        return 0
    adapter_dtype = torch.bfloat16 if args.adapter_dtype == "bf16" else torch.float32
    shapes, ms, ranks = ([(4096, 4096)], [16, 8192], [16]) if args.quick else (SHAPES, MS, RANKS)
    rows = []
    for (k, n), m, r in itertools.product(shapes, ms, ranks):
        impls = make_impls(k, n, r, torch.bfloat16, adapter_dtype)
        rows += compare(impls, m, k, n, ("peft-dora", "fastlora-lora"), r=r,
                        adapter=args.adapter_dtype)
    columns = ["K", "N", "M", "r", "adapter", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
               "fwd/peft-dora", "fwd/fastlora-lora", "fwd_bwd/peft-dora",
               "fwd_bwd/fastlora-lora", "peak_mb", "saved_mb"]
    preamble = ("Times are do_bench medians (ms); ratios are time / reference time in the same "
                "run. fastlora-dora saves x, T, the output and g; PEFT rebuilds W + sBA.")
    write_results(args.out, f"dora-{args.adapter_dtype}", environment(), rows, columns, preamble)
    return 0


if __name__ == "__main__":
    sys.exit(main())
