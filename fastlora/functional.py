"""Functional ops: argument checks, autocast, backend choice (see ``fastlora.backend``)."""
from __future__ import annotations

import numbers
import warnings

import torch

from . import backend, reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_float(name: str, t: torch.Tensor, kernel: bool) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; a floating-point tensor is required")
    if kernel and t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}, which the Triton kernels do not support "
                        "(float16, bfloat16, float32); use FASTLORA_BACKEND=torch")


def _check_devices(**named) -> None:
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def _check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, kernel: bool):
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        _check_float(name, t, kernel)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (features last)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {k} (weight shape {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, {k}], got shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or lora_B.shape[0] != n:
        raise ValueError(f"lora_B must be [{n}, r], got shape {tuple(lora_B.shape)}")
    if lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"rank mismatch: lora_A has rank {lora_A.shape[0]}, lora_B has rank {lora_B.shape[1]}")
    if lora_A.shape[0] == 0:
        raise ValueError("LoRA rank must be at least 1")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype "
                        "(outside autocast, as for F.linear)")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must have the same dtype")
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _prepare(x, weight, bias, lora_A, lora_B, scaling, dropout_p, **others):
    """Checks (``others``: further tensors that must share the device), autocast and
    backend choice shared by the LoRA ops; returns the cast tensors and the backend."""
    _check_devices(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, **others)
    x, weight, bias, lora_A, lora_B = _autocast(x.device.type, x, weight, bias, lora_A, lora_B)
    which = backend.choose(x)
    _check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, which == "triton")
    return x, weight, bias, lora_A, lora_B, which


def _autocast(device_type: str, *tensors):
    """Cast floating tensors to the autocast dtype when autocast is on, as F.linear would."""
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    if not available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _seed(seed: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """The dropout seed as a CPU int64 scalar tensor (a tensor, so compile does not specialize)."""
    if seed is not None:
        return torch.tensor(int(seed), dtype=torch.int64)
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**31 - 1, (), generator=generator, device=device,
                         dtype=torch.int64).cpu()


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                dropout_p: float = 0.0, training: bool = False, seed: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T`` (PEFT's LoRA).

    x ``[..., K]``; weight ``[N, K]``; bias ``[N]`` or None; lora_A ``[r, K]``; lora_B
    ``[N, r]``. x and weight share a dtype (fp16/bf16/fp32); the adapter may be fp32 over a
    16-bit base: the LoRA branch then runs in fp32, as PEFT's. Returns ``[..., N]`` in x's
    dtype. Dropout (LoRA branch only) applies when ``training``; its mask comes from
    ``seed`` (or one drawn from ``generator`` / torch's default generator) and is never
    stored: the backward regenerates it.
    """
    x, weight, bias, lora_A, lora_B, which = _prepare(x, weight, bias, lora_A, lora_B, scaling,
                                                      dropout_p)
    p = float(dropout_p) if training else 0.0
    if which == "torch":
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=p,
                                     training=training, generator=generator)
    from . import _ops

    lead = x.shape[:-1]
    seed_t = _seed(seed, generator) if p > 0.0 else torch.zeros((), dtype=torch.int64)
    y, _ = _ops.lora_linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B,
                                float(scaling), p, seed_t)
    return y.view(*lead, weight.shape[0])


def _check_magnitude(magnitude, weight, kernel: bool) -> None:
    _check_float("magnitude", magnitude, kernel)
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude must have shape ({weight.shape[0]},), got {tuple(magnitude.shape)}")


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per output row, fp32 ``[N]``, detached.

    The Triton path never forms ``lora_B @ lora_A`` (``N x K``): it uses
    ``||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)``.
    """
    _check_devices(weight=weight, lora_A=lora_A, lora_B=lora_B)
    which = backend.choose(weight)
    with torch.no_grad():
        if which == "torch":
            w = weight.to(lora_A.dtype)
            return reference.dora_weight_norm(w.float(), lora_A.float(), lora_B.float(), scaling)
        from . import _ops

        return _ops.dora_norm(weight, lora_A.detach(), lora_B.detach(), float(scaling))


_warned_dora_dropout = False


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                magnitude: torch.Tensor, *, dropout_p: float = 0.0, training: bool = False,
                seed: int | None = None, generator: torch.Generator | None = None,
                weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's DoRA Linear: ``g * (x W^T + s x A^T B^T) + bias``, ``g = magnitude / ||W + s B A||``.

    Shapes as ``lora_linear``, magnitude ``[N]``. The row norm is detached (as in the paper
    and PEFT); pass ``weight_norm`` (from ``dora_weight_norm``) to reuse a cached one. The
    base bias stays outside the factor. In training with dropout PEFT computes
    ``x W^T + bias + (g - 1) xd W^T + g s xd A^T B^T`` (xd = dropped x, so two base
    GEMMs): that case runs the PyTorch reference (``fastlora.reference.dora_linear``) and
    warns once; every other case runs the fused kernels (Triton backend): the norm without
    an ``N x K`` buffer, the factor applied to the GEMM's accumulator, and a backward that
    saves x, T, the output and g, and gets ``d magnitude`` from the same pass over dY.
    """
    global _warned_dora_dropout
    x, weight, bias, lora_A, lora_B, which = _prepare(x, weight, bias, lora_A, lora_B, scaling,
                                                      dropout_p, magnitude=magnitude)
    _check_magnitude(magnitude, weight, which == "triton")
    p = float(dropout_p) if training else 0.0
    if which == "triton" and p > 0.0 and not _warned_dora_dropout:
        warnings.warn("fastlora.dora_linear: DoRA with dropout in training runs the PyTorch "
                      "reference (PEFT's two base GEMMs); it is not fused", stacklevel=2)
        _warned_dora_dropout = True
    if which == "torch" or p > 0.0:
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude,
                                     dropout_p=p, training=training, generator=generator,
                                     weight_norm=weight_norm)
    from . import _ops

    if weight_norm is None:
        weight_norm = _ops.dora_norm(weight, lora_A.detach(), lora_B.detach(), float(scaling))
    g = (magnitude.float() / weight_norm.detach().float()).contiguous()
    lead = x.shape[:-1]
    y, _ = _ops.dora_linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B,
                                float(scaling), g)
    return y.view(*lead, weight.shape[0])
