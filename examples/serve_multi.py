"""Multi-tenant serving with fastlora.serve: one Llama-style model, many LoRA / DoRA adapters
paged between CPU and device memory, requests arriving over time, each with its adapter.

The model is built from a ``LlamaConfig`` (no download); the adapters are random (mixed
ranks, every fourth DoRA), saved as PEFT directories and registered in an ``AdapterPool``
with fewer device slots than adapters. Requests arrive a few per decode step (some on the
bare base model) and stream their tokens out; the script prints the pool's page-ins and
evictions, tokens/s, and, with ``--check``, whether each request's tokens equal PEFT's
greedy generation with that request's adapter alone.

    python examples/serve_multi.py --check                 # CPU, tiny sizes
    python examples/serve_multi.py --device cuda --size large

On a CPU the kernels run the PyTorch reference (or, with TRITON_INTERPRET=1, Triton's
interpreter): CPU timings say nothing about the kernels.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fastlora.serve import AdapterPool, Server

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab, prompt, new tokens, ranks
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=128, prompt=8, new=8,
                 ranks=(2, 4, 8, 16)),
    "large": dict(hidden=2048, inter=5632, layers=8, heads=16, kv=4, vocab=32000, prompt=128,
                  new=64, ranks=(8, 16, 32, 64)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(size: dict, n_adapters: int, seed: int, device, dtype, folder: Path):
    """The base model and a PEFT model with adapters t0..t{n-1} saved under ``folder``."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["inter"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv"], vocab_size=size["vocab"],
                         max_position_embeddings=4 * (size["prompt"] + size["new"]),
                         eos_token_id=None)  # random weights: generate every token asked for
    base = LlamaForCausalLM(config).to(device, dtype).eval()
    model = None
    for i in range(n_adapters):
        r = size["ranks"][i % len(size["ranks"])]
        lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=i % 4 == 3)
        if model is None:
            model = get_peft_model(copy.deepcopy(base), lora, adapter_name="t0")
        else:
            model.add_adapter(f"t{i}", lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5 / p.shape[0] ** 0.5)
    model.eval().save_pretrained(str(folder))
    return base, model


def peft_tokens(model, prompt: list[int], adapter: str | None, new: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
              do_sample=False, pad_token_id=0)
    if adapter is None:
        with model.disable_adapter():
            return model.generate(**kw)[0, len(prompt):].tolist()
    model.set_adapter(adapter)
    return model.generate(**kw)[0, len(prompt):].tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--adapters", type=int, default=16, help="registered adapters")
    parser.add_argument("--slots", type=int, default=6, help="adapters resident on the device")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--per-step", type=int, default=3, help="requests arriving per step")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--check", action="store_true", help="compare with PEFT, per request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size, device = SIZES[args.size], torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        base, peft_model = build(size, args.adapters, args.seed, device, dtype, Path(tmp))
        pool = AdapterPool(base, slots=args.slots, max_rank=max(size["ranks"]))
        for i in range(args.adapters):
            pool.register(f"t{i}", Path(tmp) / f"t{i}")
        server = Server(base, pool, max_batch=args.max_batch)
        pick = torch.randint(0, args.adapters + 2, (args.requests,), generator=g).tolist()
        queue = [(torch.randint(1, size["vocab"], (size["prompt"],), generator=g).tolist(),
                  f"t{i}" if i < args.adapters else None) for i in pick]
        print(f"{args.size} Llama on {device}: {args.adapters} adapters in {args.slots} device "
              f"slots, {args.requests} requests ({args.per_step} per step), {size['new']} tokens each")
        requests, tokens, start = [], 0, time.perf_counter()
        while queue or not server.idle:
            for prompt, adapter in queue[:args.per_step]:
                requests.append(server.submit(prompt, adapter=adapter, max_new_tokens=size["new"]))
            del queue[:args.per_step]
            tokens += len(server.step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s; {pool}")
        if args.check:
            same = [r.tokens == peft_tokens(peft_model, r.prompt, r.adapter, size["new"])
                    for r in requests]
            print(f"requests with PEFT's single-adapter tokens: {sum(same)}/{len(same)}")
            return 0 if all(same) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
