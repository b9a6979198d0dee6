"""vLLM-shaped benchmark: fastlora's fused multi-adapter op as the vLLM plugin runs it
(``fastlora.vllm``: vLLM's slot layout held as a ``StackedAdapters`` bank, one ``Routing``
per step) against vLLM's LoRA linear (its base GEMM, then its Triton shrink and expand)
when vLLM is importable, else against the same three steps in PyTorch.

One bf16 layer of a Llama-3-8B, merged QKV (K = 4096, slices 4096/1024/1024) or o_proj
(4096 x 4096), with vLLM's slot layout: 32 slots, all holding adapters, every rank padded
to the largest (rank 16, or mixed ranks 8/16/32/64 padded to 64). Tokens: decode batches
of M in 1..256 (one token per request, requests round-robin over the active slots) and
prefills of M = 2048, 8192 (one request per active slot, contiguous); 1, 8 or 32 active
slots. The step's metadata (fastlora's routing, vLLM's punica metadata) is made outside
the timing, as both make it once per step. Times: ``triton.testing.do_bench`` medians
(L2 flushed), us.

Implementations: ``fastlora`` (``multi_lora_linear``: one shrink, then the base GEMM with
every row's expand folded in); ``vllm`` (``F.linear``, then vLLM's punica wrapper's
``add_lora_linear``: shrink into an fp32 buffer, expand added into the output); without
vLLM, ``torch-sgmv`` (``F.linear``, then per active slot a shrink into fp32 and an expand
added into the output: vLLM's semantics in PyTorch); ``F.linear`` (the base layer alone,
the floor).

Writes ``vllm-<gpu>-<date>.json`` and ``.md``:

    python bench/bench_vllm.py [--quick] [--budget-s S] [--out DIR] [--dry-run]
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, Run, parser, relative  # noqa: E402

LAYERS = {"qkv": (4096, [4096, 1024, 1024]), "o_proj": (4096, [4096])}
SLOTS = 32
RANKS = {"16": [16], "mixed": [8, 16, 32, 64]}
DECODE_MS = [1, 16, 64, 256]
PREFILL_MS = [2048, 8192]
ACTIVE = [1, 8, 32]
# grids: layers, rank sets, active slots, (phase, M)
PHASES = [("decode", m) for m in DECODE_MS] + [("prefill", m) for m in PREFILL_MS]
FULL = dict(layers=list(LAYERS), ranks=list(RANKS), active=ACTIVE, phases=PHASES)
QUICK = dict(layers=["qkv"], ranks=list(RANKS), active=[1, 32],
             phases=[("decode", 16), ("decode", 256), ("prefill", 8192)])
DRY = dict(layers=["qkv", "o_proj"], ranks=["mixed"], active=[1, 3],
           phases=[("decode", 3), ("prefill", 40)])
DRY_LAYERS = {"qkv": (32, [32, 16, 16]), "o_proj": (32, [32])}
DRY_SLOTS = 4
COLUMNS = ["layer", "K", "N", "M", "phase", "active", "ranks", "impl", "us", "/F.linear",
           "/fastlora"]


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_layer(k: int, slices: list[int], slots: int, ranks: list[int], dtype, device,
               seed: int = 0):
    """(weight ``[N, K]``, ``StackedAdapters``) with every slot holding an adapter of rank
    ``ranks[i % len(ranks)]`` written as vLLM writes it (zero past its rank)."""
    from fastlora.vllm.stacked import StackedAdapters

    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(sum(slices), k, generator=g) * k ** -0.5).to(device, dtype)
    stacked = StackedAdapters(slots, max(ranks), k, slices, dtype, device)
    for slot in range(slots):
        r = ranks[slot % len(ranks)]
        for a, b in zip(stacked.lora_a_stacked, stacked.lora_b_stacked):
            a[slot, 0, :r] = (torch.randn(r, k, generator=g) * k ** -0.5).to(device, dtype)
            b[slot, 0, :, :r] = (torch.randn(b.shape[2], r, generator=g)
                                 * r ** -0.5).to(device, dtype)
        stacked.refresh(slot)
    return weight, stacked


def token_slots(m: int, active: int, prefill: bool) -> torch.Tensor:
    """vLLM's slot per token (int64, CPU): a prefill's ``active`` requests hold contiguous
    tokens; a decode batch's requests take the active slots in turn."""
    if prefill:
        return torch.arange(m) * active // m
    return torch.arange(m) % active


def vllm_punica(slots: torch.Tensor, n_slots: int, rank: int, device):
    """vLLM's punica wrapper for this platform with the step's metadata set."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper import get_punica_wrapper

    m = slots.numel()
    wrapper = get_punica_wrapper(m, max_batches=m, device=device,
                                 lora_config=LoRAConfig(max_loras=n_slots, max_lora_rank=rank))
    ids = tuple(int(s) + 1 for s in slots)
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=True),
                            list(range(1, n_slots + 1)), n_slots + 1, 32000)
    return wrapper


def make_impls(weight, stacked, slots: torch.Tensor, vllm: bool) -> dict:
    """name -> forward fn of x ``[M, K]`` for the tokens' ``slots`` ``[M]`` (CPU int64)."""
    from fastlora import multi_lora_linear
    from fastlora.adapters.routing import Routing

    device = weight.device
    routing = Routing.from_index(slots.to(device), stacked.slots)
    impls = {"F.linear": lambda x: F.linear(x, weight),
             "fastlora": lambda x: multi_lora_linear(x, weight, None, stacked.bank, routing)}
    if vllm:
        wrapper = vllm_punica(slots, stacked.slots, stacked.rank, device)
        a = tuple(t.contiguous() for t in stacked.lora_a_stacked)  # vLLM's own layout
        b = tuple(t.contiguous() for t in stacked.lora_b_stacked)

        def vllm_linear(x):
            y = F.linear(x, weight)
            out = wrapper.add_lora_linear(y, x, a, b, 1.0, stacked.slices)
            return y if out is None else out
        impls["vllm"] = vllm_linear
    else:
        segments = [(int(s), (slots == s).nonzero().squeeze(1).to(device))
                    for s in slots.unique()]
        starts = [sum(stacked.slices[:j]) for j in range(len(stacked.slices))]

        def torch_sgmv(x):
            y = F.linear(x, weight)
            for s, rows in segments:
                xs = x[rows]
                for a, b, start, width in zip(stacked.lora_a_stacked, stacked.lora_b_stacked,
                                              starts, stacked.slices):
                    t = (xs @ a[s, 0].t()).float()
                    y[rows, start:start + width] += (t @ b[s, 0].t().float()).to(y.dtype)
            return y
        impls["torch-sgmv"] = torch_sgmv
    return impls


def measure(run: Run, name: str, weight, stacked, phase: str, m: int, active: int,
            rank_name: str, vllm: bool) -> list[dict]:
    slots = token_slots(m, active, phase == "prefill")
    impls = make_impls(weight, stacked, slots, vllm)
    x = run.randn(m, weight.shape[1], seed=m)
    rows = []
    with torch.no_grad():
        for impl, fn in impls.items():
            rows.append({"impl": impl, "us": run.time_ms(lambda f=fn: f(x)) * 1e3})
    relative(rows, "us", "F.linear", "/F.linear")
    relative(rows, "us", "fastlora", "/fastlora")
    common = dict(layer=name, K=weight.shape[1], N=weight.shape[0], M=m,
                  phase=phase, active=active, ranks=rank_name)
    return [common | row for row in rows]


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--quick", action="store_true", help="merged QKV, M in {16, 256, 8192}, "
                                                        "1 and 32 active slots")
    args = p.parse_args(argv)
    run = Run.start("bench_vllm.py", args)
    grid = DRY if run.dry_run else QUICK if args.quick else FULL
    layers = DRY_LAYERS if run.dry_run else LAYERS
    n_slots = DRY_SLOTS if run.dry_run else SLOTS
    vllm = has_vllm()
    baseline = "vLLM's punica wrapper (its Triton shrink and expand on a GPU)" if vllm else \
        "torch-sgmv (vLLM is not importable here)"
    preamble = ("\n\n".join(__doc__.split("\n\n")[1:3]).replace("``", "`")
                + f"\n\nBaseline: {baseline}. /F.linear: time over the base layer alone; "
                "/fastlora: time over fastlora's.")
    results = Results(run, args.out, "vllm", "vllm", COLUMNS, preamble, None, slots=n_slots,
                      vllm=__import__("vllm").__version__ if vllm else None)
    points = list(itertools.product(grid["layers"], grid["ranks"], grid["active"],
                                    grid["phases"]))
    built = {}
    for name, rank_name, active, (phase, m) in results.budgeted(points):
        if (name, rank_name) not in built:
            built.clear()  # one layer in memory at a time
            k, slices = layers[name]
            built[name, rank_name] = make_layer(k, slices, n_slots, RANKS[rank_name], run.half,
                                                run.device)
        weight, stacked = built[name, rank_name]
        results.add(measure(run, name, weight, stacked, phase, m, min(active, n_slots),
                            rank_name, vllm))
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
