"""One rank of tests/test_distributed.py (started by torch.multiprocessing, gloo on CPU):
a patched PEFT model and an unpatched copy train a few steps under the same wrapper; the
rank saves both runs' losses, final LoRA gradients and what the patched layers did."""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

STEPS = 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def peft_model():
    """A DoRA adapter and a lora_bias adapter, both active and trainable (the fused path
    runs dora_linear on them stacked)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = ["up", "down"]
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                             init_lora_weights=False, use_dora=True))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                      init_lora_weights=False, lora_bias=True))
    model.base_model.set_adapter(["default", "b"])
    return model


def count_fused_calls() -> dict:
    import fastlora.peft.forward as forward

    calls = {"fused": 0}
    for op in ("lora_linear", "dora_linear"):
        real = getattr(forward, op)

        def spy(*a, _real=real, **kw):
            calls["fused"] += 1
            return _real(*a, **kw)

        setattr(forward, op, spy)
    return calls


def wrap(model, how: str):
    """``how``: "ddp", or "fsdp2" (each Block, then the root, ``fully_shard``ed)."""
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.base_model.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n and p.grad is not None:
            g = p.grad
            out[n.replace("module.", "")] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def train(model, rank: int) -> tuple[list[float], dict]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x, target = torch.randn(6, 16, generator=g), torch.randn(6, 4, generator=g)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        losses.append(loss.item())
        if step < STEPS - 1:
            opt.step()
    return losses, lora_grads(model)


def run(rank: int, world: int, port: int, out_dir: str, scenarios: list) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastlora

    try:
        calls = count_fused_calls()
        results = {}
        for how, patch_first in scenarios:  # fastlora.patch before or after the wrapper
            ref = peft_model()
            model = copy.deepcopy(ref)
            if patch_first:
                report = fastlora.patch(model)
            model = wrap(model, how)
            if not patch_first:
                report = fastlora.patch(model)
            ref = wrap(ref, how)
            calls["fused"] = 0
            losses, grads = train(model, rank)
            fused = calls["fused"]
            ref_losses, ref_grads = train(ref, rank)
            results[(how, patch_first)] = dict(
                losses=losses, ref_losses=ref_losses, grads=grads, ref_grads=ref_grads,
                fused=fused, patched=len(report.patched), total=len(report.layers),
                notes=[n for e in report for n in e.notes])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()

