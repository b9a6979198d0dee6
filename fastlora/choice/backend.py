"""Backend choice: which implementation a functional op runs.

CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference, unless
``TRITON_INTERPRET=1`` (then the Triton kernels run in the interpreter, which is how the
tests exercise them without a GPU). ``FASTLORA_BACKEND=torch|triton`` overrides both.

Determinism: the kernels' backward sums partial gradients with fp32 atomics, whose order
varies from run to run on a GPU, so CUDA gradients are not bit-reproducible (forwards
are). Under ``torch.use_deterministic_algorithms(True)`` a CUDA op that will be
differentiated runs the PyTorch reference instead (deterministic, slower, with ``M x N``
temporaries), with a warning.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("torch", "triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose(x: torch.Tensor, *operands: torch.Tensor | None,
           compute_dtype: torch.dtype | None = None) -> str:
    """The backend for an op whose main input is ``x`` and whose matmul operands (x among
    them) are ``x, *operands`` (``compute_dtype``: a further dtype a matmul runs in, that of
    a 4-bit base weight's tiles).

    Raises where the choice cannot give a right answer: Triton forced for a CPU tensor
    without the interpreter, or a bfloat16 operand in the interpreter (whose bf16 ``tl.dot``
    returns wrong values: use fp16/fp32 there, or the PyTorch reference for bf16 on CPU).
    """
    forced = os.environ.get("FASTLORA_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FASTLORA_BACKEND={forced!r}: expected one of {BACKENDS}")
    if forced == "triton" and not (x.is_cuda or interpreting()):
        raise RuntimeError(
            f"FASTLORA_BACKEND=triton but the input is on {x.device}: the Triton kernels "
            "need a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
    which = forced or ("triton" if x.is_cuda or (x.device.type == "cpu" and interpreting())
                       else "torch")
    dtypes = [t.dtype for t in (x, *operands) if t is not None] + [compute_dtype]
    if which == "triton" and not x.is_cuda and torch.bfloat16 in dtypes:
        raise RuntimeError(
            "bfloat16 under TRITON_INTERPRET=1: the Triton interpreter computes bf16 matmuls "
            "wrongly; use float16/float32 in the interpreter, or FASTLORA_BACKEND=torch (the "
            "PyTorch reference) for bfloat16 on CPU")
    if which == "triton" and x.is_cuda and not forced and _needs_deterministic_grads(x, *operands):
        _warn_deterministic()
        return "torch"
    return which


def _needs_deterministic_grads(*tensors: torch.Tensor | None) -> bool:
    return (torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in tensors))


_warned_deterministic = False


def _warn_deterministic() -> None:
    global _warned_deterministic
    if not _warned_deterministic:
        warnings.warn("fastlora: torch.use_deterministic_algorithms is on and the kernels' "
                      "backward reduces with atomics (not bit-reproducible): running the "
                      "PyTorch reference instead", stacklevel=4)
        _warned_deterministic = True
