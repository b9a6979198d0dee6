"""QLoRA benchmark: fastlora.lora_linear over a bitsandbytes 4-bit (NF4, nested absmax,
blocksize 64) base weight vs F.linear on the 16-bit weight and vs PEFT's ``Linear4bit``
LoRA layer (bitsandbytes dequantizes W, cuBLAS multiplies, then the LoRA branch).

One layer, K = N = 4096, rank 16, bf16; decode (M = 16) and M = 8192; forward, and
forward + backward against PEFT; the forward's memory-traffic bound (bytes it must move at
the copy bandwidth: the packed weight and its scales, x, the output, the adapter). The
fastlora rows read a 4-bit weight of random codes and scales (the time does not depend on
the values), so they run without bitsandbytes; the PEFT rows need it and are left out,
with a note, when it is not installed. Writes ``qlora-<gpu>-<date>.json`` and ``.md``.

    python bench/bench_qlora.py [--budget-s S] [--out DIR] [--dry-run]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer import measure  # noqa: E402
from common import Results, Run, nbytes, parser, quantize_linears4, relative  # noqa: E402

FULL = dict(k=4096, n=4096, r=16, ms=[16, 8192])
DRY = dict(k=128, n=192, r=8, ms=[16, 19])
COLUMNS = ["K", "N", "M", "r", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd/F.linear",
           "fwd/peft-4bit", "fwd_bwd/peft-4bit", "bound_ms", "fwd/bound", "peak_mb", "saved_mb"]
PREAMBLE = ("Times are medians of triton.testing.do_bench (ms, L2 flushed before each call, "
            "warm-up excluded); a ratio is time / the reference's time in the same run (below "
            "1: faster). fastlora-4bit: fastlora.lora_linear on the packed NF4 weight (tiles "
            "dequantized in registers); peft-4bit: PEFT's LoRA on bitsandbytes' Linear4bit; "
            "F.linear: the 16-bit weight, no adapter (the dense floor); fastlora-16bit: "
            "fastlora.lora_linear on the 16-bit weight. bound_ms: the bytes the forward must "
            "move (weights as stored, x, output, adapter) at the measured copy bandwidth.")


def peft_4bit(k: int, n: int, r: int, dtype: torch.dtype, device):
    """PEFT's LoRA layer on a bitsandbytes ``Linear4bit`` (NF4, nested), or None without
    bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype))
    quantize_linears4(model, dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
    layer = get_peft_model(model, config).base_model.model[0]
    layer.lora_A["default"].to(dtype)
    layer.lora_B["default"].to(dtype)
    layer.train()  # as in fine-tuning
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def make_impls(run: Run, k: int, n: int, r: int) -> dict:
    """(name -> (forward fn of x, trainable params), the 4-bit weight, (W16, A, B))."""
    import fastlora
    from fastlora.ops.quant4 import Quant4Weight

    dtype = run.half
    w16 = run.randn(n, k, seed=1) * k ** -0.5
    q4 = Quant4Weight.random((n, k), dtype, run.device, torch.Generator().manual_seed(0))
    A = run.randn(r, k, seed=2, requires_grad=True)
    B = run.randn(n, r, seed=3, requires_grad=True)
    impls = {
        "F.linear": (lambda x: F.linear(x, w16), []),
        "fastlora-16bit": (lambda x: fastlora.lora_linear(x, w16, None, A, B, 2.0), [A, B]),
        "fastlora-4bit": (lambda x: fastlora.lora_linear(x, q4, None, A, B, 2.0), [A, B]),
    }
    peft = peft_4bit(k, n, r, dtype, run.device)
    if peft is not None:
        impls["peft-4bit"] = (peft[0], peft[1])
    return impls, q4, (w16, A, B)


def bound_bytes(impl: str, m: int, k: int, n: int, r: int, q4, w16, A, B) -> int:
    """What the forward of ``impl`` must read and write, in bytes."""
    io = m * (k + n) * 2  # x in, y out, 16-bit
    if impl == "F.linear":
        return io + nbytes(w16)
    adapter = nbytes(A, B)
    if impl == "fastlora-16bit":
        return io + nbytes(w16) + adapter
    return io + adapter + sum(nbytes(t) for t in q4.tensors().values())


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    run = Run.start("bench_qlora.py", args)
    g = DRY if run.dry_run else FULL
    k, n, r = g["k"], g["n"], g["r"]
    results = Results(run, args.out, "qlora", "qlora", COLUMNS, PREAMBLE, None)
    impls, q4, dense = make_impls(run, k, n, r)
    if "peft-4bit" not in impls:
        results.note("bitsandbytes is not installed: the peft-4bit rows (PEFT's Linear4bit "
                      "LoRA layer) are left out; pip install --no-index --find-links .whl "
                      "bitsandbytes")
    bandwidth = run.copy_bandwidth()
    results.data["meta"]["copy_bandwidth_gbs"] = bandwidth / 1e9
    for m in results.budgeted(g["ms"]):
        x = run.randn(m, k, seed=m, requires_grad=True)
        dy = run.randn(m, n, seed=m + 1)
        rows = []
        for name, (fn, params) in impls.items():
            row = dict(K=k, N=n, M=m, r=r, impl=name, **measure(run, fn, params, x, dy))
            row["bound_ms"] = bound_bytes(name, m, k, n, r, q4, *dense) / bandwidth * 1e3
            row["fwd/bound"] = row["fwd_ms"] / row["bound_ms"]
            rows.append(row)
        relative(rows, "fwd_ms", "F.linear", "fwd/F.linear")
        if "peft-4bit" in impls:
            relative(rows, "fwd_ms", "peft-4bit", "fwd/peft-4bit")
            relative(rows, "fwd_bwd_ms", "peft-4bit", "fwd_bwd/peft-4bit")
        results.add(rows)
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
