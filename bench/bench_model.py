"""Model benchmark: PEFT LoRA vs ``fastlora.patch`` on a ~1B Llama-style model.

One training step (forward + backward, LoRA r=16 on every linear layer, dropout 0.05) and
decode steps (one new token per sequence on a KV cache), bf16 base weights, adapters in
PEFT's default fp32 (``--adapter-dtype bf16`` for bf16 adapters). The model is built from
a config (random weights, no download). Each step is measured on unpatched PEFT, then on
the same model patched in place, one right after the other.

``--quant4``: the QLoRA variant. The decoder layers' linear layers become bitsandbytes
``Linear4bit`` quantized from the random weights (NF4, double-quantized absmax, 16-bit
compute; embeddings, norms and the LM head stay 16-bit), so PEFT wraps them in its
bitsandbytes LoRA layer. Needs bitsandbytes. Writes ``model-4bit-<gpu>-<date>.*``.

Times: training, the median of ``triton.testing.do_bench`` (one step first, so autotuning
is never timed); decode, steps back to back from the host with no flush between them
(host time included, as ``generate`` sees it). Memory: ``torch.cuda.max_memory_allocated``
over one step.

Writes ``model-<gpu>-<date>.json`` and ``.md``:

    python bench/bench_model.py [--quant4] [--quick] [--budget-s S] [--out DIR] [--dry-run] [sizes]
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Results, Run, llama, llama_options, parser, presets,  # noqa: E402
                    quantize_linears4)

FULL = dict(layers=16, batch=4, seq=1024, context=1024, decode_batch=[1, 16], rep_ms=1000)
QUICK = dict(layers=4, batch=2, seq=256, context=256, decode_batch=[1], rep_ms=300)
# K and N multiples of 64, as in real models: bitsandbytes 0.50's CPU dequantize_4bit (the
# --quant4 dry run's PEFT reference) is wrong when K is a multiple of 16 but not of the blocksize
DRY = dict(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=4, vocab=256, batch=2,
           seq=16, context=16, decode_batch=[1], rep_ms=0)
COLUMNS = ["step", "tokens", "peft_ms", "fastlora_ms", "speedup", "peft_tok_s",
           "fastlora_tok_s", "peft_peak_gib", "fastlora_peak_gib", "peft_step_gib",
           "fastlora_step_gib", "error"]


def parse_args(argv=None):
    p = parser(__doc__)
    llama_options(p, kv_heads=32)
    p.add_argument("--batch", type=int, help="training batch (default 4; 2 quick)")
    p.add_argument("--seq", type=int, help="training sequence length (default 1024; 256 quick)")
    p.add_argument("--context", type=int, help="decode KV-cache length (default 1024; 256 quick)")
    p.add_argument("--decode-batch", type=int, nargs="+", help="decode batch sizes (default 1 16)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: PEFT's default (autocast_adapter_dtype=True) over the bf16 base")
    p.add_argument("--quant4", action="store_true",
                   help="QLoRA: the decoder layers' linear weights in bitsandbytes NF4 "
                        "(double-quantized absmax, bf16 compute); needs bitsandbytes")
    return presets(p.parse_args(argv), FULL, QUICK, DRY)


def build_model(args, run: Run):
    """A Llama-style model from a config, wrapped by PEFT LoRA on every linear layer."""
    from peft import LoraConfig, get_peft_model

    base = llama(args, run.device, run.half, max(4096, args.seq, args.context + 8),
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if args.quant4:
        quantize_linears4(base, run.half, within=base.model.layers)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                      target_modules="all-linear")
    model = get_peft_model(base, lora, autocast_adapter_dtype=args.adapter_dtype == "fp32")
    with torch.no_grad():  # as after some training: lora_B no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def train_step(model, args, run: Run):
    """A training step: (step fn, its timer, tokens, clear gradients)."""
    ids = torch.randint(3, args.vocab, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1)).to(run.device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()

    def clear():
        for p in params:
            p.grad = None

    return step, lambda: run.time_ms(step, grad_to_none=params, rep_ms=args.rep_ms), \
        args.batch * args.seq, clear


def decode_step(model, args, run: Run, batch: int):
    """A decode step on a KV cache of ``args.context`` tokens, cropped back after each call
    so that every call is alike: (step fn, its timer, tokens, no-op)."""
    from transformers import DynamicCache

    prompt = torch.randint(3, args.vocab, (batch, args.context),
                           generator=torch.Generator().manual_seed(2)).to(run.device)
    cache = DynamicCache(config=model.config)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    tok = logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step():
        model.eval()
        model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache.crop(-1)

    return step, lambda: run.back_to_back_ms(step), batch, lambda: None


def measure(run: Run, step, time_ms, tokens: int, clear) -> dict:
    """Time and memory of one step: ms, tokens/s, the peak and what the step adds to it."""
    try:
        step()  # warm-up: autotuning before the memory and time measurements
        clear()
        start = torch.cuda.memory_allocated() if run.device.type == "cuda" else 0
        added = run.peak_bytes(step)
        clear()
        ms = time_ms()
        clear()
    except torch.cuda.OutOfMemoryError:
        clear()
        return {"error": "out of memory"}
    finally:
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    gib = (lambda b: None if added is None else b / 2**30)
    return {"ms": ms, "tok_s": tokens / (ms / 1e3), "peak_gib": gib((added or 0) + start),
            "step_gib": gib(added or 0)}


def check_outputs(model, args, run: Run) -> dict:
    """Logits of the patched model vs PEFT's (eval, dropout off) on a short batch."""
    import fastlora

    model.eval()
    ids = torch.randint(3, args.vocab, (2, 64),
                        generator=torch.Generator().manual_seed(3)).to(run.device)
    with torch.no_grad():
        fastlora.unpatch(model)
        ref = model(input_ids=ids).logits.float()
        fastlora.patch(model)
        got = model(input_ids=ids).logits.float()
        fastlora.unpatch(model)
    diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    return {"logits_max_abs_diff": diff, "logits_max_abs": scale,
            "relative": diff / max(scale, 1e-12)}


def preamble(args, model, report, check: dict) -> str:
    n_params = sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) else
                   p.numel() for p in model.parameters())  # a 4-bit weight: its unpacked size
    base = ("decoder layers' linear weights bitsandbytes NF4 (double-quantized absmax, "
            "blocksize 64), 16-bit compute and other weights" if args.quant4 else "16-bit base")
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return "\n".join([
        f"- model: Llama-style, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, {args.heads} heads ({args.kv_heads} KV), vocab {args.vocab}, "
        f"{n_params / 1e6:,.1f}M parameters, {base}" + ("; **--quick run**" if args.quick else ""),
        f"- LoRA r={args.rank} alpha={2 * args.rank} dropout {args.dropout} on all linear layers "
        f"({n_lora / 1e6:,.2f}M parameters), {args.adapter_dtype} adapters, "
        f"{len(report.patched)}/{len(report.layers)} layers patched",
        f"- training batch {args.batch} x {args.seq} tokens; decode on a {args.context}-token "
        "KV cache",
        "- times: training, triton.testing.do_bench median; decode, steps back to back (host "
        "time included); peak: torch.cuda.max_memory_allocated over one step; step: what the "
        "step adds to the memory held before it",
        f"- check: patched vs PEFT logits max abs diff {check['logits_max_abs_diff']:.3g} "
        f"(relative {check['relative']:.3g})"])


def main(argv=None) -> int:
    import fastlora

    args = parse_args(argv)
    if args.quant4:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            sys.exit(f"bench_model.py: --quant4 needs bitsandbytes ({e}): nothing was measured. "
                     "pip install bitsandbytes (offline: --no-index --find-links .whl)")
    run = Run.start("bench_model.py", args)
    model = build_model(args, run)
    report = fastlora.patch(model)
    check = check_outputs(model, args, run)  # leaves the model unpatched
    name = "model-4bit" if args.quant4 else "model"
    results = Results(run, args.out, name, name, COLUMNS, preamble(args, model, report, check),
                      check=check)
    points = [("training step (fwd+bwd)", train_step, ())]
    points += [(f"decode step, batch {b}, context {args.context}", decode_step, (b,))
               for b in args.decode_batch]
    for label, make, extra in results.budgeted(points):
        row = {"step": label}
        for impl in ("peft", "fastlora"):
            (fastlora.patch if impl == "fastlora" else fastlora.unpatch)(model)
            step, time_ms, tokens, clear = make(model, args, run, *extra)
            row["tokens"] = tokens
            row |= {f"{impl}_{k}": v for k, v in measure(run, step, time_ms, tokens, clear).items()}
        fastlora.unpatch(model)
        if row.get("peft_ms") and row.get("fastlora_ms"):
            row["speedup"] = row["peft_ms"] / row["fastlora_ms"]
        row["error"] = row.pop("peft_error", None) or row.pop("fastlora_error", None)
        results.add([row])
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
