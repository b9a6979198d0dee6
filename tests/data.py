"""Seeded test data on the device under test: drawn on the CPU from a seeded generator (so
CPU and CUDA runs see the same values), then moved with ``.to(device, dtype)``.

Every random input of a test comes from here (or from a generator seeded in the test),
never from torch's global generator, so that no test can pass or fail by chance.
"""
from __future__ import annotations

import os

import torch


# FASTLORA_TEST_SEED=n shifts every seed by n: the same tests on other data, to check that
# none passes or fails by chance.
SEED_OFFSET = int(os.environ.get("FASTLORA_TEST_SEED", "0"))


def generator(seed: int) -> torch.Generator:
    """A CPU generator; tensors drawn from it go to the device afterwards."""
    return torch.Generator().manual_seed(seed + SEED_OFFSET)


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

