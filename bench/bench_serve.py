"""Serving benchmark: decode steps of a Llama-style model with a different LoRA adapter per
request (``fastlora.serve``), and the page-in time of one adapter.

Decode: one new token for each of B sequences on a static KV cache of ``--context`` tokens,
the rows spread over n distinct rank-16 adapters on every linear layer (row i -> adapter
i mod n), B in {16, 64, 128}, n in {1, 8, 32, 128} (n <= B). ``base``: the model alone;
``fastlora``: the model attached to an ``AdapterBank`` (``fastlora.serve.attach``), one
static routing per batch; ``peft-mixed``: PEFT's ``adapter_names`` mixed batch (eager only:
PEFT builds its row lists on the host in every call). ``eager_ms``: steps back to back
from the host (as a serving loop without graphs sees them); ``graph_ms``: the step replayed
from one CUDA graph (its routing assigned before the capture). ``bound_ms``: the bytes a
step must read (every linear weight and lm_head once, the adapters present, the KV cache)
at the device-to-device copy bandwidth measured in the same run.

Paging: an ``AdapterPool`` with 4 device slots cycling through 8 registered rank-16 adapters
of the model (every ``reserve`` is a miss: one eviction and one page-in from pinned CPU
memory); ``page_in_ms`` is the median time from ``reserve`` to a synchronized device (host
work included), against the 5 ms target; ``copy_ms`` the plain host-to-device copy of the
same bytes.

Writes ``serve-<gpu>-<date>.json`` and ``.md``:

    python bench/bench_serve.py [--quick] [--layers L] [--budget-s S] [--out DIR] [--dry-run]
"""
from __future__ import annotations

import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, Run, llama, llama_options, parser, presets  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(rows=[16, 64, 128], adapters=[1, 8, 32, 128], layers=16, context=512,
            peft_adapters=32, page_reps=20)
QUICK = dict(rows=[64], adapters=[1, 32], layers=4, context=256, peft_adapters=32, page_reps=10)
DRY = dict(rows=[6], adapters=[1, 3], layers=1, context=16, peft_adapters=3, page_reps=2,
           hidden=64, intermediate=96, heads=4, kv_heads=4, vocab=256)
RANK = 16
COLUMNS = ["rows", "adapters", "impl", "eager_ms", "graph_ms", "bound_ms", "graph/bound",
           "eager/bound", "tokens_s", "graph_tokens_s", "eager/peft", "graph/base", "no_graph",
           "adapter_mb", "page_in_ms", "page_in_max_ms", "copy_ms", "page_in_GBps"]


def parse_args(argv=None):
    p = parser(__doc__)
    llama_options(p, kv_heads=4)
    p.add_argument("--context", type=int, help="KV-cache tokens (default 512)")
    p.add_argument("--rows", type=int, nargs="+", help="decode batch sizes (default 16 64 128)")
    p.add_argument("--adapters", type=int, nargs="+", help="distinct adapters (default 1 8 32 128)")
    p.add_argument("--peft-adapters", type=int,
                   help="adapters the PEFT model holds (default 32: building 128 PEFT adapters "
                        "costs minutes); larger batches have no PEFT row")
    p.add_argument("--page-reps", type=int, help="page-ins timed (default 20)")
    return presets(p.parse_args(argv), FULL, QUICK, DRY)


def random_adapter(model, seed: int, device) -> dict:
    """``{module name: (A [r, K], B [N, r], scale, None)}`` on every targeted linear layer,
    signed random, drawn on ``device`` from a seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    layers = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            n, k = module.weight.shape
            A = torch.randn(RANK, k, generator=g, device=device) * k ** -0.5
            B = torch.randn(n, RANK, generator=g, device=device) * 0.02
            layers[name] = (A.to(module.weight.dtype), B.to(module.weight.dtype), 2.0, None)
    return layers


def build_peft(base, adapters: list[dict]):
    """A PEFT copy of ``base`` holding ``adapters`` (a0, a1, ...), same weights."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0",
                           autocast_adapter_dtype=False)
    for i in range(1, len(adapters)):
        model.add_adapter(f"a{i}", config)
    inner = model.base_model.model
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            for name, (A, B, _, _) in adapter.items():
                layer = inner.get_submodule(name)
                layer.lora_A[f"a{i}"].weight.copy_(A)
                layer.lora_B[f"a{i}"].weight.copy_(B)
    return model.eval()


def traffic_bytes(model, rows: int, context: int, present: list[dict]) -> dict:
    """Bytes a decode step reads: ``base`` (every linear weight once, the KV cache) and with
    the adapters ``present`` added."""
    weights = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    kv = cfg.num_hidden_layers * 2 * rows * cfg.num_key_value_heads * head_dim * (context + 1) * elem
    adapters = sum(t.numel() * t.element_size() for a in present for A, B, _, _ in a.values()
                   for t in (A, B))
    return {"base": weights + kv, "adapted": weights + kv + adapters}


def rollback(cache, tokens: int) -> None:
    """Move every layer of a static cache back by ``tokens`` positions, in place on the
    device (a captured step replays it; the next step overwrites them): each layer's
    ``crop(-tokens)`` where it has one (transformers 5.25), else its length tensor moved
    back (5.17, whose static layers have no ``crop``)."""
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-tokens)
        else:
            layer.cumulative_length.sub_(tokens)


class Decode:
    """The decode steps of one batch size: a static cache of ``context`` tokens shared by
    every implementation (each step writes one column and rolls it back). The cache goes
    to the model under the keyword its transformers version takes (``cache_keyword``)."""

    def __init__(self, run: Run, model, rows: int, context: int):
        from transformers import StaticCache

        from fastlora.serve.kv import cache_keyword

        self.run, self.rows = run, rows
        g = torch.Generator().manual_seed(rows)
        prompt = torch.randint(3, model.config.vocab_size, (rows, context), generator=g)
        self.cache = StaticCache(config=model.config, max_cache_len=context + 1)
        self.keyword = cache_keyword(model)
        with torch.no_grad():
            model(input_ids=prompt.to(run.device), **{self.keyword: self.cache}, use_cache=True,
                  logits_to_keep=1)
        self.ids = torch.randint(3, model.config.vocab_size, (rows, 1), generator=g).to(run.device)
        self.positions = torch.full((rows, 1), context, device=run.device)

    def step(self, model, context=None, **kw):
        """One decode step of ``model`` (inside ``context()``), then the cache rolled back."""
        import contextlib

        def step():
            with torch.no_grad(), (context or contextlib.nullcontext)():
                model(input_ids=self.ids, position_ids=self.positions,
                      **{self.keyword: self.cache}, use_cache=True, logits_to_keep=1, **kw)
                rollback(self.cache, 1)
        return step


def decode_point(run: Run, args, base, bank, peft_model, adapters, bandwidth, decode, routing,
                 n: int) -> list[dict]:
    """The rows of one point: ``decode.rows`` sequences over ``n`` distinct adapters."""
    from fastlora.serve import attach, detach, routed

    rows = decode.rows
    names = [f"a{i % n}" for i in range(rows)]
    bank.assign(routing, names)
    traffic = traffic_bytes(base, rows, args.context, adapters[:n])
    steps = {"base": (decode.step(base), ""),
             "fastlora": (decode.step(base, lambda: routed(routing)), "")}
    if n <= args.peft_adapters:
        steps["peft-mixed"] = (decode.step(peft_model, adapter_names=names),
                               "PEFT builds its row lists on the host in every call")
    measured = {}
    for impl, (step, no_graph) in steps.items():
        if impl == "base":  # the model alone, not the attached classes
            detach(base)
        try:
            eager, graph, why = run.decode_ms([step], no_graph)
        finally:
            if impl == "base":
                attach(base, bank)
        bound = traffic["base" if impl == "base" else "adapted"] / bandwidth * 1e3
        measured[impl] = {"rows": rows, "adapters": n, "impl": impl, "eager_ms": eager,
                          "graph_ms": graph, "bound_ms": bound,
                          "graph/bound": graph / bound if graph else None,
                          "eager/bound": eager / bound, "tokens_s": rows / eager * 1e3,
                          "graph_tokens_s": rows / graph * 1e3 if graph else None,
                          "no_graph": why or None}
    peft_ms = measured.get("peft-mixed", {}).get("eager_ms")
    base_graph = measured["base"]["graph_ms"]
    for row in measured.values():
        row["eager/peft"] = row["eager_ms"] / peft_ms if peft_ms else None
        row["graph/base"] = row["graph_ms"] / base_graph if row["graph_ms"] and base_graph else None
    return list(measured.values())


def paging_row(run: Run, args, base) -> dict:
    """Page-in time of one rank-16 adapter of ``base`` (see the module docstring)."""
    from fastlora.serve import AdapterPool

    pool = AdapterPool(base, slots=4, max_rank=RANK)
    for i in range(8):
        layers = random_adapter(base, 1000 + i, run.device)
        pool.register(f"p{i}", {k: (A.cpu(), B.cpu(), s, m) for k, (A, B, s, m) in layers.items()})
    size = pool._host["p0"].nbytes()
    times = []
    for i in range(args.page_reps + 4):  # the first four fill the slots
        run.sync()
        start = time.perf_counter()
        pool.reserve([f"p{i % 8}"])
        run.sync()
        if i >= 4:
            times.append((time.perf_counter() - start) * 1e3)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=run.device.type == "cuda")
    dev = torch.empty(size, dtype=torch.uint8, device=run.device)
    copy_ms = run.time_ms(lambda: dev.copy_(host, non_blocking=True))
    page_in = statistics.median(times)
    return {"impl": "page-in", "adapter_mb": size / 2**20, "page_in_ms": page_in,
            "page_in_max_ms": max(times), "copy_ms": copy_ms,
            "page_in_GBps": size / (page_in * 1e-3) / 1e9}


def check_outputs(base, bank, peft_model, run: Run) -> dict:
    """Logits of the attached model vs PEFT's mixed batch on one short batch."""
    from fastlora.serve import routed

    n = min(3, bank.capacity)
    names = [f"a{i % n}" for i in range(4)]
    ids = torch.randint(3, base.config.vocab_size, (4, 8),
                        generator=torch.Generator().manual_seed(3)).to(run.device)
    with torch.no_grad():
        with routed(bank.index(names)):
            got = base(input_ids=ids).logits.float()
        ref = peft_model(input_ids=ids, adapter_names=names).logits.float()
    diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    return {"logits_max_abs_diff": diff, "relative": diff / max(scale, 1e-12)}


def main(argv=None) -> int:
    from fastlora.adapters.bank import AdapterBank
    from fastlora.serve import attach

    args = parse_args(argv)
    run = Run.start("bench_serve.py", args)
    base = llama(args, run.device, run.half, args.context + 16, eos_token_id=None).eval()
    n_max = max(args.adapters)
    adapters = [random_adapter(base, i, run.device) for i in range(n_max)]
    bank = AdapterBank(base, capacity=n_max, max_rank=RANK, fixed=True)
    for i, adapter in enumerate(adapters):
        bank.load(f"a{i}", adapter)
    peft_model = build_peft(base, adapters[:args.peft_adapters])
    attach(base, bank)
    check = check_outputs(base, bank, peft_model, run)
    bandwidth = run.copy_bandwidth()
    n_params = sum(p.numel() for p in base.parameters())
    preamble = "\n\n".join(__doc__.split("\n\n")[1:3]).replace("``", "`") + (
        f"\n\nModel: Llama-style, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, {args.heads} heads ({args.kv_heads} KV), vocab {args.vocab}, "
        f"{n_params / 1e6:,.0f}M parameters, 16-bit; context {args.context}; rank {RANK} on "
        f"{', '.join(TARGETS)}. Measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s. Check: "
        f"fastlora vs PEFT logits, relative difference {check['relative']:.2g}.")
    results = Results(run, args.out, "serve", "serve", COLUMNS, preamble, check=check,
                      copy_GBps=bandwidth / 1e9)
    results.add([paging_row(run, args, base)])

    @functools.lru_cache(maxsize=1)  # one batch size's cache at a time
    def decoder(rows):
        return Decode(run, base, rows, args.context), bank.static_index(rows)

    points = [(rows, n) for rows in args.rows for n in args.adapters if n <= rows]
    for rows, n in results.budgeted(points):
        results.add(decode_point(run, args, base, bank, peft_model, adapters, bandwidth,
                                 *decoder(rows), n))
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
