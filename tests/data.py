"""Seeded test data on the device under test: drawn on the CPU from a seeded generator (so
CPU and CUDA runs see the same values), then moved with ``.to(device, dtype)``.

Every random input of a test comes from here (or from a generator seeded in the test),
never from torch's global generator, so that no test can pass or fail by chance.
"""
from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator; tensors drawn from it go to the device afterwards."""
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator, device="cpu", dtype=torch.float32, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Signed normal data ``scale * N(0, 1)`` of ``shape`` on ``device``."""
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def rand(*shape, g: torch.Generator, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) data of ``shape`` on ``device``."""
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def randint(low: int, high: int, shape, *, g: torch.Generator, device="cpu",
            dtype=torch.int64) -> torch.Tensor:
    """Integers in ``[low, high)`` of ``shape`` on ``device``."""
    return torch.randint(low, high, tuple(shape), generator=g).to(device=device, dtype=dtype)


def randperm(n: int, *, g: torch.Generator, device="cpu") -> torch.Tensor:
    return torch.randperm(n, generator=g).to(device)


def fill_(module: torch.nn.Module, g: torch.Generator, scale: float = 0.5) -> torch.nn.Module:
    """Overwrite every floating parameter of ``module`` with seeded signed data (a module's
    own init draws from torch's global generator), keeping dtypes and devices."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(randn(*p.shape, g=g, scale=scale))
    return module
