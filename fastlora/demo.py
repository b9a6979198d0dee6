"""``python -m fastlora demo``: patch a small PEFT model and check it against PEFT.

Builds a tiny Llama-style model from a config (no download), wraps it with PEFT LoRA on
every linear layer, patches a copy with ``fastlora.patch`` and compares with unpatched
PEFT: logits, the LoRA gradients of one training step, and greedy ``generate`` tokens.
On a GPU it also times forward and forward+backward, patched vs unpatched. On a CPU the
timing is skipped: there the kernels run in Triton's interpreter (or the PyTorch
reference), so times say nothing about the kernels.

Exit code 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlora demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--vocab", type=int, default=128, help="vocabulary size (default 128)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch (default 2)")
    p.add_argument("--seq", type=int, default=8, help="tokens per sequence (default 8)")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens to generate (default 4)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="auto: Triton on a GPU; on a CPU the Triton interpreter "
                        "(TRITON_INTERPRET=1) unless the kernels were already loaded")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and data (default 0)")
    return p


def _choose_backend(args) -> str:
    """Set FASTLORA_BACKEND / TRITON_INTERPRET for the run; returns a description."""
    if args.backend == "torch":
        os.environ["FASTLORA_BACKEND"] = "torch"
        return "PyTorch reference (FASTLORA_BACKEND=torch)"
    if args.device == "cpu":
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        # TRITON_INTERPRET is read when the kernels are defined (first use of the Triton
        # path): setting it now works unless they are already loaded.
        if not interp and "fastlora.kernels" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
            interp = True
        if interp:
            if args.backend == "triton":
                os.environ["FASTLORA_BACKEND"] = "triton"
            return "Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)"
        if args.backend == "triton":
            raise SystemExit("--backend triton on a CPU needs TRITON_INTERPRET=1 before fastlora's "
                             "kernels load")
        return "PyTorch reference (CPU, no TRITON_INTERPRET)"
    if args.backend == "triton":
        os.environ["FASTLORA_BACKEND"] = "triton"
    return "Triton kernels (CUDA)"


def _device_problem(device: str, torch) -> str | None:
    """Why ``--device`` cannot run here, or None."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        return f"--device {device!r}: {e}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
               else "PyTorch sees no CUDA device")
        return f"--device {device}: {why} (torch {torch.__version__}); run with --device cpu"
    if dev.type not in ("cuda", "cpu"):
        return f"--device {device}: the demo runs on cuda or cpu"
    return None


def _import_problem(e: ImportError) -> str:
    """The demo's dependencies: missing (install hint), or installed and failing (the real error)."""
    missing = getattr(e, "name", None)
    if isinstance(e, ModuleNotFoundError) and missing in ("peft", "transformers"):
        return f"the demo needs {missing}: pip install 'fastlora[peft]'"
    return f"importing peft / transformers failed: {type(e).__name__}: {e}"


def _rel(a, b) -> tuple[float, float]:
    d = (a.detach().double() - b.detach().double()).abs().max().item()
    scale = b.detach().double().abs().max().item()
    return d, d / scale if scale > 0 else d


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = _device_problem(args.device, torch)
    if problem:
        print(f"fastlora demo: error: {problem}", file=sys.stderr)
        return 2
    how = _choose_backend(args)

    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(f"fastlora demo: error: {_import_problem(e)}", file=sys.stderr)
        return 1
    from .choice import backend
    from .peft import patch

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 16)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), vocab_size=args.vocab,
                      max_position_embeddings=max(64, args.seq + args.new_tokens),
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(cfg).to(device)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules="all-linear")
    ref = get_peft_model(base, lora)
    with torch.no_grad():  # as after some training: lora_B no longer zero
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model = copy.deepcopy(ref)
    report = patch(model)

    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device)
    which = backend.choose(ids.new_empty(0, dtype=torch.float32))
    n_params = sum(p.numel() for p in ref.parameters())
    n_lora = sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n)
    print(f"fastlora demo: Llama-style model, hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {n_params:,} parameters ({n_lora:,} LoRA, r={args.rank}), "
          f"device {device}")
    print(f"fast path: {how} [backend.choose -> {which}]")
    print()
    print(report)
    print()

    # fp32 comparisons; on a GPU the kernels' fp32 dots may use TF32
    tol = 1e-4 if device.type == "cpu" else 2e-2
    checks: list[tuple[str, float | None, float | None, bool]] = []
    n_layers = len(report.layers)
    checks.append((f"LoRA layers patched: {len(report.patched)} of {n_layers}", None, None,
                   report.all_patched and n_layers > 0))
    t0 = time.perf_counter()
    model.train()
    ref.train()
    out = model(ids, labels=ids)
    exp = ref(ids, labels=ids)
    d, r = _rel(out.logits, exp.logits)
    checks.append(("logits", d, r, r <= tol))
    d, r = _rel(out.loss, exp.loss)
    checks.append(("loss", d, r, r <= tol))
    out.loss.backward()
    exp.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    worst_d, worst_r, complete = 0.0, 0.0, grads.keys() == ref_grads.keys() and bool(grads)
    for n, g in ref_grads.items():
        if g is None or grads.get(n) is None:
            complete = False
            continue
        d, r = _rel(grads[n], g)
        worst_d, worst_r = max(worst_d, d), max(worst_r, r)
    checks.append((f"LoRA grads ({len(ref_grads)} tensors, worst)", worst_d, worst_r,
                   complete and worst_r <= tol))

    model.eval()
    ref.eval()
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
               do_sample=False, pad_token_id=0)
    with torch.no_grad():
        toks = model.generate(input_ids=ids[:1], **gen)
        ref_toks = ref.generate(input_ids=ids[:1], **gen)
    same = torch.equal(toks, ref_toks)
    checks.append((f"generate {args.new_tokens} tokens: equal", None, None, same))
    elapsed = time.perf_counter() - t0

    print(f"correctness vs unpatched PEFT (fp32, relative tolerance {tol:g}):")
    width = max(len(c[0]) for c in checks)
    print(f"  {'check':<{width}}  {'max abs diff':>12}  {'relative':>9}  verdict")
    for name, d, r, ok in checks:
        d_s = "-" if d is None else f"{d:.3g}"
        r_s = "-" if r is None else f"{r:.3g}"
        print(f"  {name:<{width}}  {d_s:>12}  {r_s:>9}  {'PASS' if ok else 'FAIL'}")
    print(f"  generated: patched {toks[0, args.seq:].tolist()}  PEFT {ref_toks[0, args.seq:].tolist()}")
    print(f"  ({elapsed:.1f} s)")
    print()

    if device.type == "cuda":
        _timing(model, ref, cfg, args, torch)
    else:
        print("timing: skipped on a CPU. There the Triton kernels run in Triton's Python "
              "interpreter (TRITON_INTERPRET=1) or the PyTorch reference runs instead, so "
              "times say nothing about the kernels; run the demo (or bench/bench_model.py) "
              "on a CUDA GPU for forward/backward times.")
        print()

    ok = all(c[3] for c in checks)
    print("verdict:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def _timing(model, ref, cfg, args, torch) -> None:
    """Forward and forward+backward times of the demo model in bf16, patched vs PEFT."""
    from triton.testing import do_bench

    batch, seq = 4, 256
    ids = torch.randint(3, args.vocab, (batch, seq), device="cuda")
    rows = []
    for label, m in (("PEFT", ref), ("fastlora", model)):
        m = copy.deepcopy(m).to(torch.bfloat16).train()
        params = [p for p in m.parameters() if p.requires_grad]

        def fwd():
            with torch.no_grad():
                m(ids)

        def fwd_bwd():
            m(ids, labels=ids).loss.backward()

        t_f = do_bench(fwd, warmup=10, rep=50, return_mode="median")
        t_fb = do_bench(fwd_bwd, warmup=10, rep=50, grad_to_none=params, return_mode="median")
        rows.append((label, t_f, t_fb))
        del m
    print(f"timing on {torch.cuda.get_device_name()} (bf16 copy of the demo model, batch {batch} x "
          f"{seq} tokens, triton.testing.do_bench medians; a tiny model is launch-bound: see "
          "bench/bench_model.py for a 1B model):")
    print(f"  {'':<9} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for label, t_f, t_fb in rows:
        print(f"  {label:<9} {t_f:>11.3f} {t_fb:>11.3f}")
    print(f"  {'speedup':<9} {rows[0][1] / rows[1][1]:>10.2f}x {rows[0][2] / rows[1][2]:>10.2f}x")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
