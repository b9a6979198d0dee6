"""Functional ops: argument checks (``fastlora.ops.checks``), autocast, backend choice
(``fastlora.choice.backend``) and the dropout seed, then the custom ops or the PyTorch reference.

Dropout seed: on the Triton path the seed is an int64 tensor on x's device that the kernels
load (never a host integer), drawn per call with ``torch.randint`` on the device's
generator (a CUDA graph replays that draw with fresh values, so every replay has a new
mask) or filled from an explicit ``seed=`` int; the backward reuses the saved tensor.
On the PyTorch path ``seed=`` seeds a generator for the reference's mask: a seed gives
the same mask on every call of one backend, but CPU (reference) and Triton masks differ.
"""
from __future__ import annotations

import math
import warnings

import torch

from .choice import backend
from .ops import checks
from . import reference
from .ops.quant4 import Quant4Weight, as_quant4, is_bnb_4bit
from .adapters.routing import Routing


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` when autocast is on there, else None."""
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    if not available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(device_type: str, *tensors):
    """Cast floating tensors to the autocast dtype when autocast is on, as F.linear would."""
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _prepare(x, weight, bias, lora_A, lora_B, scaling, dropout_p, **others):
    """Checks (``others``: further tensors that must share the device), autocast and
    backend choice shared by the LoRA ops; returns the cast tensors (a 4-bit weight as a
    ``Quant4Weight`` with its compute dtype set) and the backend.

    A 4-bit weight follows bitsandbytes' ``Linear4bit``: its compute dtype is the view's
    ``compute_dtype``, else the autocast dtype, else x's; x, the bias and the result keep
    their dtypes (the kernels cast x's tiles), autocast casts the adapter only."""
    quant = as_quant4(weight, _autocast_dtype(x.device.type) or x.dtype) \
        if isinstance(x, torch.Tensor) else None
    if quant is None:
        checks.check_devices(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B,
                             **others)
        x, weight, bias, lora_A, lora_B = _autocast(x.device.type, x, weight, bias, lora_A,
                                                    lora_B)
        which = backend.choose(x, weight, lora_A, lora_B)
    else:
        checks.check_devices(x=x, bias=bias, lora_A=lora_A, lora_B=lora_B, **others)
        weight = quant
        lora_A, lora_B = _autocast(x.device.type, lora_A, lora_B)
        which = backend.choose(x, lora_A, lora_B, compute_dtype=quant.compute_dtype)
    checks.check_lora(x, weight, bias, lora_A, lora_B, scaling, dropout_p, which == "triton")
    return x, weight, bias, lora_A, lora_B, which


def _op_weight(weight) -> tuple:
    """(weight, quant, quant_meta, compute_dtype) as ``fastlora.ops.library`` takes a dense or a
    4-bit (``Quant4Weight``) base weight."""
    if isinstance(weight, Quant4Weight):
        return (*weight.op_args(), weight.compute_dtype)
    return weight, [], None, None


def _seed(seed: int | None, generator: torch.Generator | None,
          device: torch.device) -> torch.Tensor:
    """The kernels' dropout seed: an int64 ``[1]`` tensor on ``device``, no host sync.

    From ``seed`` (a fill: the value is a launch argument, so a captured graph keeps it)
    or drawn from ``generator`` / the device's default generator (a graph replays the draw
    with a fresh value). A generator on another device draws there and copies the value.
    """
    if seed is not None:
        return torch.full((1,), int(seed), dtype=torch.int64, device=device)
    where = generator.device if generator is not None else device
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=where, generator=generator)
    return drawn.to(device)


def _generator(seed: int | None, generator: torch.Generator | None,
               device: torch.device) -> torch.Generator | None:
    """The reference's mask generator: one seeded from ``seed`` when given."""
    if seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(int(seed))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                dropout_p: float = 0.0, training: bool = False, seed: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T`` (PEFT's LoRA).

    x ``[..., K]``; weight ``[N, K]``; bias ``[N]`` or None; lora_A ``[r, K]``; lora_B
    ``[N, r]``. x and weight share a dtype (fp16/bf16/fp32); the adapter may be fp32 over a
    16-bit base: the LoRA branch then runs in fp32, as PEFT's. Returns ``[..., N]`` in x's
    dtype.

    weight may be bitsandbytes 4-bit: a ``Params4bit`` or a ``fastlora.ops.quant4.Quant4Weight``
    (NF4/FP4, double-quantized absmax or not). Its tiles are dequantized inside the fused
    kernels (the ``N x K`` weight is never built) in the compute dtype of bitsandbytes'
    ``Linear4bit``: the view's ``compute_dtype``, else the autocast dtype, else x's; x may
    have another float dtype, and the result has x's. The 4-bit weight gets no gradient.
    Dropout (LoRA branch only) applies when ``training``; its mask comes from
    ``seed`` (or from ``generator`` / the default generator of x's device) and is never
    stored: the backward regenerates it. A seed reproduces a mask on one backend; the
    Triton kernels and the PyTorch reference draw different masks from the same seed.
    """
    checks.check_random(training, seed, generator)
    x, weight, bias, lora_A, lora_B, which = _prepare(x, weight, bias, lora_A, lora_B, scaling,
                                                      dropout_p)
    p = float(dropout_p) if training else 0.0
    if which == "torch":
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=p,
                                     training=training,
                                     generator=_generator(seed, generator, x.device))
    from .ops import library

    lead = x.shape[:-1]
    seed_t = _seed(seed, generator, x.device) if p > 0.0 else None
    w, quant, meta, compute = _op_weight(weight)
    y, _ = library.lora_linear_fwd(x.reshape(-1, x.shape[-1]), w, bias, lora_A, lora_B,
                                float(scaling), p, seed_t, quant, meta, compute)
    return y.view(*lead, weight.shape[0])


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per output row, fp32 ``[N]``, detached.

    weight ``[N, K]`` (or bitsandbytes 4-bit, as in ``lora_linear``: dequantized tile by
    tile, in fp32 on the Triton path, to the adapter's dtype on the PyTorch one), lora_A
    ``[r, K]``, lora_B ``[N, r]`` (float, one device). The Triton path never forms
    ``lora_B @ lora_A`` (``N x K``): it uses
    ``||W||^2 + 2s rowsum(B * (W A^T)) + s^2 rowsum((B (A A^T)) * B)``.
    """
    quant = as_quant4(weight, lora_A.dtype) if isinstance(lora_A, torch.Tensor) else None
    if quant is None:
        checks.check_devices(weight=weight, lora_A=lora_A, lora_B=lora_B)
    with torch.no_grad():
        which = backend.choose(weight, lora_A) if quant is None else backend.choose(lora_A, lora_B)
        checks.check_norm(quant or weight, lora_A, lora_B, scaling, which == "triton")
        if which == "torch":
            w = weight.to(lora_A.dtype) if quant is None else \
                reference.dequantize_4bit(quant, lora_A.dtype)
            return reference.dora_weight_norm(w.float(), lora_A.float(), lora_B.float(), scaling)
        from .ops import library

        w, quant_parts, meta, _ = _op_weight(quant or weight)
        return library.dora_norm(w, lora_A.detach(), lora_B.detach(), float(scaling), quant_parts,
                              meta)


_warned_dora_dropout: set[str] = set()  # the ops that warned


def _warn_dora_dropout(op: str) -> None:
    if op not in _warned_dora_dropout:
        warnings.warn(f"fastlora.{op}: DoRA with dropout in training runs the PyTorch "
                      "reference (PEFT's two base GEMMs); it is not fused", stacklevel=3)
        _warned_dora_dropout.add(op)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                magnitude: torch.Tensor, *, dropout_p: float = 0.0, training: bool = False,
                seed: int | None = None, generator: torch.Generator | None = None,
                weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's DoRA Linear: ``g * (x W^T + s x A^T B^T) + bias``, ``g = magnitude / ||W + s B A||``.

    Shapes as ``lora_linear`` (weight dense or bitsandbytes 4-bit, as there), magnitude
    ``[N]``. The row norm is detached (as in the paper
    and PEFT); pass ``weight_norm`` ``[N]`` (from ``dora_weight_norm``) to reuse a cached one
    (finite and positive: checked on the host for a CPU tensor, not on a GPU). The
    base bias stays outside the factor. In training with dropout PEFT computes
    ``x W^T + bias + (g - 1) xd W^T + g s xd A^T B^T`` (xd = dropped x, so two base
    GEMMs): that case runs the PyTorch reference (``fastlora.reference.dora_linear``, mask
    from ``seed`` / ``generator``) and warns once; every other case runs the fused kernels
    (Triton backend): the norm without an ``N x K`` buffer, the factor applied to the GEMM's
    accumulator, and a backward that saves x, T, the output and g, and gets
    ``d magnitude`` from the same pass over dY.
    """
    checks.check_random(training, seed, generator)
    x, weight, bias, lora_A, lora_B, which = _prepare(x, weight, bias, lora_A, lora_B, scaling,
                                                      dropout_p, magnitude=magnitude,
                                                      weight_norm=weight_norm)
    checks.check_magnitude(magnitude, weight, which == "triton")
    if weight_norm is not None:
        checks.check_weight_norm(weight_norm, weight.shape[0])
    p = float(dropout_p) if training else 0.0
    if which == "triton" and p > 0.0:
        _warn_dora_dropout("dora_linear")
    if which == "torch" or p > 0.0:
        return reference.dora_linear(x, weight, bias, lora_A, lora_B, scaling, magnitude,
                                     dropout_p=p, training=training,
                                     generator=_generator(seed, generator, x.device),
                                     weight_norm=weight_norm)
    from .ops import library

    w, quant, meta, compute = _op_weight(weight)
    if weight_norm is None:
        weight_norm = library.dora_norm(w, lora_A.detach(), lora_B.detach(), float(scaling),
                                     quant, meta)
    g = (magnitude.float() / weight_norm.detach().float()).contiguous()
    lead = x.shape[:-1]
    y, _ = library.dora_linear_fwd(x.reshape(-1, x.shape[-1]), w, bias, lora_A, lora_B,
                                float(scaling), g, quant, meta, compute)
    return y.view(*lead, weight.shape[0])


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bank,
                      adapter_index, *, training: bool = False, seed: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-row adapters: row i of x ``[..., K]`` uses adapter ``adapter_index[i]`` of the
    bank (-1: base only); weight ``[N, K]``, bias ``[N]`` or None. Returns ``[..., N]`` in
    x's dtype; each row equals ``fastlora.lora_linear`` (or ``dora_linear``) with its adapter.

    ``adapter_index``: a ``fastlora.adapters.routing.Routing`` (made once per model forward, e.g. by
    ``AdapterBank.index``: this call then does no index checks and no row grouping of its
    own; an entry per sequence serves all its rows) or an integer tensor with one entry per
    row (x's leading shape, or flattened), checked and grouped here.

    Batches of at most ``fastlora.kernels.multi_meta.GATHER_MAX_M`` (128) rows (decode
    steps) take a path that sorts nothing: two launches per call, a shrink in which every
    row gathers its adapter's A and the fused linear gathering its B (W read once, DoRA's
    g made in the kernel). Larger batches use the rows grouped by adapter (made once per
    routing and row count) and tensor-core dots per adapter; so does the backward, whose
    groups a differentiable decode call makes once per routing too, not once per layer.

    The bank is a ``fastlora.adapters.packed.PackedAdapters`` (or anything with a ``packed()``
    method giving one, such as a ``fastlora.adapters.bank.AdapterBank`` layer). Differentiable in x,
    weight, bias and the bank's A, B and magnitude: each adapter's rows get the gradient of
    its own rows only (zero for adapters absent from the batch). In training, adapter i's
    rows see dropout ``bank.dropout[i]`` (mask from ``seed`` or ``generator``, regenerated
    in the backward); a bank whose DoRA adapters have dropout (``bank.dora_dropout``) runs
    the PyTorch reference (``fastlora.reference.multi_lora_linear``) in training, with a
    warning, as ``dora_linear``. Nothing is read back from the device: the Triton path can
    be captured in a CUDA graph. Under autocast x, weight and bias are cast; the adapters'
    dots run in the bank's dtype.

    Index range: on CPU an index outside ``-1 .. n - 1`` (or, for a bank's adapters, on an
    empty slot) raises ``ValueError``; on CUDA it is checked without a host sync by a
    device-side assert (``torch._assert_async``: the error surfaces at the next
    synchronization and, as for an out-of-range ``nn.Embedding`` index, leaves the CUDA
    context unusable); the kernels clamp indices meanwhile, so they never read out of
    bounds. A routing whose adapter was unloaded or replaced since it was made raises
    ``RuntimeError`` naming it (``Routing.check``).
    """
    if isinstance(weight, Quant4Weight) or is_bnb_4bit(weight):
        raise TypeError("multi_lora_linear takes a dense base weight; a bitsandbytes 4-bit "
                        "weight is not supported here (lora_linear and dora_linear take it)")
    checks.check_random(training, seed, generator)
    bank = bank.packed()
    checks.check_devices(x=x, weight=weight, bias=bias)
    x, weight, bias = _autocast(x.device.type, x, weight, bias)
    which = backend.choose(x, weight, bank.A, bank.B)
    checks.check_multi(x, weight, bias, bank, which == "triton")
    m = math.prod(x.shape[:-1])
    routing = adapter_index
    if not isinstance(routing, Routing):
        routing = Routing.from_index(adapter_index, bank.n, slots=bank.slots, device=x.device,
                                     rows=m)
    routing.check(bank)
    drop = training and bank.dropout is not None
    if drop and bank.dora_dropout:
        if which == "triton":
            _warn_dora_dropout("multi_lora_linear")
        which = "torch"
    if which == "torch":
        with torch.autocast(x.device.type, enabled=False):
            return reference.multi_lora_linear(x, weight, bias, bank, routing.row_index(m),
                                               training=drop,
                                               generator=_generator(seed, generator, x.device))
    from .ops import library

    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, bank.A, bank.B, bank.magnitude))
    # the backward works on grouped rows: made once per routing
    adapters, rows = library.multi_args(bank, routing, m, dropout=drop, grouped=differentiable)
    y = library.multi_lora(x.reshape(-1, x.shape[-1]), weight, bias, bank.A, bank.B,
                           bank.magnitude, adapters, rows, int(bank.max_rank),
                           _seed(seed, generator, x.device) if drop else None,
                           record=differentiable)
    return y.view(*x.shape[:-1], weight.shape[0])
