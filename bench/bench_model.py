"""Model-level benchmark: PEFT LoRA vs ``fastlora.patch`` on a ~1B Llama-style model (GPU).

One training step (forward + backward, LoRA r=16 on every linear layer, dropout 0.05)
and one decode step (one new token per sequence on a KV cache), bf16 base weights, the
adapter in PEFT's default fp32 (``--adapter-dtype bf16`` for bf16 adapters). The model is
built from a config (random weights, no download). The same model is measured as
unpatched PEFT, then patched in place, measured again, and unpatched.

Times: ``triton.testing.do_bench`` medians after warm-up (autotuning is done in the
warm-up, never timed). Memory: ``torch.cuda.max_memory_allocated`` over one step. Writes
``model-<gpu>-<date>.json`` and ``.md`` to ``--out`` (default ``bench/results/``) with the
GPU name and torch/triton/peft/transformers versions. Without CUDA it says so and exits 0.

    python bench/bench_model.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 layers, small batch, short timing (not the 1B figures)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=None, help="default 16 (4 with --quick)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=None, help="training batch (default 4; 2 quick)")
    p.add_argument("--seq", type=int, default=None, help="training sequence length (default 1024; 256 quick)")
    p.add_argument("--context", type=int, default=None, help="decode KV-cache length (default 1024; 256 quick)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=None,
                   help="decode batch sizes (default 1 16; 1 quick)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: PEFT's default (autocast_adapter_dtype=True) over the bf16 base")
    args = p.parse_args(argv)
    q = args.quick
    args.layers = args.layers or (4 if q else 16)
    args.batch = args.batch or (2 if q else 4)
    args.seq = args.seq or (256 if q else 1024)
    args.context = args.context or (256 if q else 1024)
    args.decode_batch = args.decode_batch or ([1] if q else [1, 16])
    args.warmup_ms, args.rep_ms = (200, 500) if q else (1000, 3000)
    return args


def build_model(args, device, dtype):
    """A Llama-style model from a config, wrapped by PEFT LoRA on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(4096, args.seq, args.context + 8),
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                      target_modules="all-linear")
    model = get_peft_model(base, lora, autocast_adapter_dtype=args.adapter_dtype == "fp32")
    with torch.no_grad():  # as after some training: lora_B no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model, cfg


class Measure:
    """Timing and peak memory of a callable on one device."""

    def __init__(self, device, warmup_ms: float, rep_ms: float, timer=None):
        import torch
        self.torch = torch
        self.device = device
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.timer = timer  # (fn, grad_to_none) -> ms; default triton.testing.do_bench

    def time_ms(self, fn, grad_to_none=None) -> float:
        if self.timer is not None:
            return self.timer(fn, grad_to_none)
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                              grad_to_none=grad_to_none, return_mode="median"))

    def peak(self, fn) -> dict:
        torch = self.torch
        if self.device.type != "cuda":
            fn()
            return {"peak_gib": None, "step_gib": None}
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_gib": peak / 2**30, "step_gib": (peak - before) / 2**30}


def run_case(model, args, device, measure: Measure) -> dict:
    """Training step and decode steps of ``model`` in its current (patched or not) state."""
    import torch
    from transformers import DynamicCache

    out = {}
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()

    def clear_grads():
        for p in params:
            p.grad = None

    try:
        train_step()  # warm-up (autotuning) before the memory and time measurements
        clear_grads()
        mem = measure.peak(train_step)
        clear_grads()
        ms = measure.time_ms(train_step, grad_to_none=params)
        clear_grads()
        tokens = args.batch * args.seq
        out["train"] = {"tokens": tokens, "ms": ms, "tokens_per_s": tokens / (ms / 1e3), **mem}
    except torch.cuda.OutOfMemoryError:
        clear_grads()
        out["train"] = {"tokens": args.batch * args.seq, "error": "out of memory"}
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model.eval()
    for b in args.decode_batch:
        key = f"decode_b{b}"
        try:
            with torch.no_grad():
                prompt = torch.randint(3, args.vocab, (b, args.context), generator=gen).to(device)
                cache = DynamicCache(config=model.config)
                logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
                tok = logits[:, -1:].argmax(-1)

                def decode_step():
                    model(input_ids=tok, past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # back to the same context: every call is alike

                decode_step()
                mem = measure.peak(decode_step)
                ms = measure.time_ms(decode_step)
            out[key] = {"tokens": b, "context": args.context, "ms": ms,
                        "tokens_per_s": b / (ms / 1e3), **mem}
        except torch.cuda.OutOfMemoryError:
            out[key] = {"tokens": b, "context": args.context, "error": "out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def check_outputs(model, args, device) -> dict:
    """Logits of the patched model vs PEFT (eval, dropout off) on a short batch."""
    import torch
    from fastlora.peft import patch, unpatch

    model.eval()
    ids = torch.randint(3, args.vocab, (2, 64), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        unpatch(model)
        ref = model(input_ids=ids).logits.float()
        patch(model)
        got = model(input_ids=ids).logits.float()
        unpatch(model)
    diff = (got - ref).abs().max().item()
    return {"logits_max_abs_diff": diff, "logits_max_abs": ref.abs().max().item(),
            "relative": diff / max(ref.abs().max().item(), 1e-12)}


def benchmark(args, device, timer=None) -> dict:
    import torch
    import triton
    import peft
    import transformers
    from fastlora.peft import patch, unpatch

    dtype = torch.bfloat16
    model, cfg = build_model(args, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    measure = Measure(device, args.warmup_ms, args.rep_ms, timer)

    report = patch(model)
    unpatch(model)
    results = {"peft": run_case(model, args, device, measure)}
    patch(model)
    results["fastlora"] = run_case(model, args, device, measure)
    unpatch(model)
    check = check_outputs(model, args, device)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "benchmark": "model", "quick": args.quick,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "peft": peft.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "model": {"arch": "llama", "hidden": args.hidden, "intermediate": args.intermediate,
                  "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "vocab": args.vocab, "parameters": n_params, "dtype": "bf16"},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": args.dropout,
                 "target_modules": "all-linear", "adapter_dtype": args.adapter_dtype,
                 "parameters": n_lora, "layers_patched": len(report.patched),
                 "layers_total": len(report.layers)},
        "train": {"batch": args.batch, "seq": args.seq},
        "timing": {"method": "triton.testing.do_bench median" if timer is None else "custom timer",
                   "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms},
        "check": check,
        "results": results,
    }


def _fmt(x, spec) -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    m, lora = res["model"], res["lora"]
    lines = [
        f"# Model benchmark: PEFT vs fastlora.patch ({res['gpu']})",
        "",
        f"- date {res['date']}; torch {res['torch']}, triton {res['triton']}, peft {res['peft']}, "
        f"transformers {res['transformers']}, CUDA {res['cuda']}" + ("; **--quick run**" if res["quick"] else ""),
        f"- model: Llama-style, hidden {m['hidden']}, intermediate {m['intermediate']}, {m['layers']} "
        f"layers, {m['heads']} heads ({m['kv_heads']} KV), vocab {m['vocab']}, "
        f"{m['parameters'] / 1e9:.2f}B parameters, bf16",
        f"- LoRA r={lora['r']} alpha={lora['alpha']} dropout {lora['dropout']} on all linear layers, "
        f"{lora['adapter_dtype']} adapters, {lora['layers_patched']}/{lora['layers_total']} layers patched",
        f"- times: {res['timing']['method']} (warm-up {res['timing']['warmup_ms']} ms, "
        f"{res['timing']['rep_ms']} ms of repetitions); memory: torch.cuda.max_memory_allocated over one step",
        f"- check: patched vs PEFT logits max abs diff {res['check']['logits_max_abs_diff']:.3g} "
        f"(relative {res['check']['relative']:.3g})",
        "",
        "| step | tokens | PEFT ms | fastlora ms | speedup | PEFT tok/s | fastlora tok/s "
        "| PEFT peak GiB | fastlora peak GiB | PEFT step GiB | fastlora step GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peft_r, fast_r = res["results"]["peft"], res["results"]["fastlora"]
    for key in peft_r:
        a, b = peft_r[key], fast_r.get(key, {})
        label = ("training step (fwd+bwd)" if key == "train"
                 else f"decode step, batch {a['tokens']}, context {a['context']}")
        if "error" in a or "error" in b:
            lines.append(f"| {label} | {a['tokens']} | {a.get('error', _fmt(a.get('ms'), '.2f'))} | "
                         f"{b.get('error', _fmt(b.get('ms'), '.2f'))} | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {label} | {a['tokens']} | {a['ms']:.2f} | {b['ms']:.2f} | {a['ms'] / b['ms']:.2f}x "
            f"| {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | {_fmt(a['peak_gib'], '.2f')} "
            f"| {_fmt(b['peak_gib'], '.2f')} | {_fmt(a['step_gib'], '.2f')} | {_fmt(b['step_gib'], '.2f')} |")
    lines.append("")
    return "\n".join(lines)


def write(res: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", res["gpu"]).strip("-") or "gpu"
    stem = f"model-{gpu}-{res['date'][:10]}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(res, indent=2) + "\n")
    md_path.write_text(markdown(res))
    return json_path, md_path


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_model.py needs a CUDA GPU (torch.cuda.is_available() is False): "
              "nothing was measured.")
        return 0
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"bench_model.py needs peft and transformers: pip install 'fastlora[bench]' ({e})")
        return 1
    res = benchmark(args, torch.device("cuda"))
    json_path, md_path = write(res, args.out)
    print(markdown(res))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
