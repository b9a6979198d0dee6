"""Backend choice: which implementation a functional op runs.

CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference, unless
``TRITON_INTERPRET=1`` (then the Triton kernels run in the interpreter, which is how the
tests exercise them without a GPU). ``FASTLORA_BACKEND=torch|triton`` overrides both.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose(x: torch.Tensor) -> str:
    """The backend for an op whose main input is ``x``."""
    forced = os.environ.get("FASTLORA_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTLORA_BACKEND={forced!r}: expected one of {BACKENDS}")
        if forced == "triton" and not (x.is_cuda or interpreting()):
            raise RuntimeError(
                f"FASTLORA_BACKEND=triton but the input is on {x.device}: the Triton kernels "
                "need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
        return forced
    if x.is_cuda or (x.device.type == "cpu" and interpreting()):
        return "triton"
    return "torch"
