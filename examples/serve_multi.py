"""Multi-tenant serving sketch: one Llama-style model, many LoRA / DoRA adapters, a queue of
requests each naming its adapter, batched greedy generation with a different adapter per row.

The model is built from a ``LlamaConfig`` (no download); the adapters are random (mixed
ranks, every fourth one DoRA; a few requests use the bare base model). Three
engines serve the same queue, batch by batch; the script reports their tokens/s and the
share of requests whose tokens agree with PEFT's:

* ``peft``: PEFT's own mixed batch, ``generate(adapter_names=...)``. PEFT refuses DoRA
  adapters in a mixed batch, so a batch holding one is served one adapter group at a time.
* ``fastlora-peft``: the same PEFT model after ``fastlora.patch(model)``: its ``lora.Linear``
  layers take ``adapter_names`` in one fused pass per layer, DoRA adapters included.
* ``fastlora-bank``: the plain base model with a ``fastlora.bank.AdapterBank`` loaded from
  the adapters' saved PEFT directories; each adapted linear layer calls
  ``fastlora.multi_lora_linear`` with the batch's per-row adapter indices.

    python examples/serve_multi.py                        # CPU, tiny sizes, well under a minute
    python examples/serve_multi.py --device cuda --size large

On a CPU the fastlora engines run the PyTorch reference backend (the Triton kernels need a
GPU, or TRITON_INTERPRET=1 to run them slowly in Triton's interpreter), so CPU timings say
nothing about the kernels.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab, prompt, new tokens, ranks
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=128, prompt=8, new=8,
                 ranks=(2, 4, 8, 16), requests=32, batch=8),
    "large": dict(hidden=2048, inter=5632, layers=8, heads=16, kv=4, vocab=32000, prompt=128,
                  new=64, ranks=(8, 16, 32, 64), requests=128, batch=32),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(size: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["inter"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv"], vocab_size=size["vocab"],
                         max_position_embeddings=size["prompt"] + size["new"] + 8)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def add_adapters(base, n: int, ranks, seed: int):
    """PEFT model with adapters t0..t{n-1}: rank ranks[i % len], DoRA for i % 4 == 3."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = None
    for i in range(n):
        r = ranks[i % len(ranks)]
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=i % 4 == 3)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"t{i}")
        else:
            model.add_adapter(f"t{i}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5 / p.shape[0] ** 0.5)
            elif "magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    return model.eval()


def peft_engine(model, ids, names, new):
    """PEFT's mixed batch; per adapter group when the batch holds a DoRA adapter."""
    dora = {a for a, cfg in model.peft_config.items() if cfg.use_dora}
    if not dora & set(names):
        return generate(model, ids, new, adapter_names=names)
    out = torch.empty((ids.shape[0], new), dtype=torch.long, device=ids.device)
    for a in set(names):
        rows = torch.tensor([n == a for n in names], device=ids.device)
        if a == "__base__":
            with model.disable_adapter():
                out[rows] = generate(model, ids[rows], new)
        else:
            model.set_adapter(a)
            out[rows] = generate(model, ids[rows], new)
    return out


def generate(model, ids, new, **kw):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


class BankServer:
    """The plain base model serving an AdapterBank: each adapted linear layer reads the
    current batch's per-row adapter indices."""

    def __init__(self, base, adapter_dirs: dict[str, Path], dtype):
        from fastlora.bank import AdapterBank

        self.model, self.index = base, None
        self.bank = AdapterBank(base, dtype=dtype)
        for name, path in adapter_dirs.items():
            self.bank.load(name, path)
        for layer in self.bank.layers:
            module = base.get_submodule(layer)
            module.forward = self._forward(module, self.bank[layer])

    def _forward(self, module, layer_bank):
        from fastlora import multi_lora_linear

        def forward(x):
            index = self.index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
            return multi_lora_linear(x, module.weight, module.bias, layer_bank, index)
        return forward

    def __call__(self, ids, names, new):
        self.index = self.bank.index(names, device=ids.device)
        return generate(self.model, ids, new)


def serve(engine, queue, batch: int, new: int, device) -> tuple[torch.Tensor, float]:
    """Generated tokens for every request, and tokens/s (after one warm-up batch)."""
    ids, names = queue
    engine(ids[:batch], names[:batch], new)  # warm-up: autotuning, caches
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = [engine(ids[i:i + batch], names[i:i + batch], new) for i in range(0, len(names), batch)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return torch.cat(outs), len(names) * new / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=None, help="default: per size")
    parser.add_argument("--batch", type=int, default=None, help="default: per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, requests = args.batch or size["batch"], args.requests or size["requests"]
    requests -= requests % batch

    base = build_model(size, device, dtype)
    plain = copy.deepcopy(base)
    model = add_adapters(base, args.adapters, size["ranks"], args.seed)
    adapters = list(model.peft_config)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, size["vocab"], (requests, size["prompt"]), generator=g).to(device)
    pick = torch.randint(0, len(adapters) + 2, (requests,), generator=g).tolist()
    names = [adapters[i] if i < len(adapters) else "__base__" for i in pick]
    print(f"{args.size} Llama ({size['layers']} layers, hidden {size['hidden']}) on {device}, "
          f"{len(adapters)} adapters (ranks {size['ranks']}, DoRA: every 4th), {requests} "
          f"requests in batches of {batch}, {size['new']} new tokens each")

    results = {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        base_tokens = torch.cat([generate(plain, ids[i:i + batch], size["new"])
                                 for i in range(0, requests, batch)])
        results["peft"] = serve(lambda i, n, k: peft_engine(model, i, n, k), (ids, names), batch,
                                size["new"], device)
        model.save_pretrained(tmp)
        adapter_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
        import fastlora

        fastlora.patch(model)
        results["fastlora-peft"] = serve(lambda i, n, k: generate(model, i, k, adapter_names=n),
                                         (ids, names), batch, size["new"], device)
        server = BankServer(plain, {a: Path(tmp) / a for a in adapters}, adapter_dtype)
        results["fastlora-bank"] = serve(server, (ids, names), batch, size["new"], device)
    reference = results["peft"][0]
    adapted = torch.tensor([n != "__base__" for n in names], device=device)
    changed = (reference != base_tokens).any(1)[adapted].float().mean().item()
    print(f"adapters changed the tokens of {changed:.0%} of the adapted requests")
    for engine, (tokens, rate) in results.items():
        same = (tokens == reference).all(1).float().mean().item()
        print(f"{engine:>14}: {rate:9.1f} tokens/s   requests with PEFT's tokens: {same:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
