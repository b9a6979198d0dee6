"""``fastlora.warmup`` and ``fastlora.explain``: measure before CUDA-graph capture, and say
which implementation runs a layer's stages (see ``fastlora.choice.dispatch``); ``warmup_multi``
does the same for a multi-adapter call.

``warmup`` and ``explain`` describe one layer call by its shapes: x ``[..., K]`` (leading
dims flattened to M), weight ``[N, K]``, LoRA rank r. Inside a capture a kernel never
tunes: one that was not warmed up raises naming its shape (``fastlora.kernels.capture``).
The kernels (and Triton) are imported on first use.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .dispatch import Explanation, StageSpec


def _stages(x_shape, weight_shape, rank: int, dtype, adapter_dtype, bias: bool,
            dropout_p: float, dora: bool, training: bool, device, quant4: bool = False
            ) -> dict[str, StageSpec]:
    from . import dispatch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but no CUDA device is available: pass "
                           "device='cpu' to see what a CPU call runs")

    n, k = weight_shape
    if x_shape[-1] != k:
        raise ValueError(f"x has {x_shape[-1]} features but weight expects {k}")
    return dispatch.layer_stages(math.prod(x_shape[:-1]), k, n, rank, dtype=dtype,
                                 adapter_dtype=adapter_dtype or dtype, bias=bias,
                                 dropout=dropout_p > 0.0, dora=dora, training=training,
                                 quant4=quant4)


def explain(x_shape, weight_shape, rank: int, *, dtype: torch.dtype = torch.bfloat16,
            adapter_dtype: torch.dtype | None = None, bias: bool = True, dropout_p: float = 0.0,
            dora: bool = False, training: bool = True, device="cuda",
            quant4: bool = False) -> list[Explanation]:
    """Which implementation runs each linear stage of ``lora_linear`` (``dora_linear`` with
    ``dora=True``) for these shapes on ``device``, why, and the median times (ms) of the
    candidates that chose it. Times nothing: see ``warmup``. ``print`` the items for a
    one-line summary each. ``quant4``: the weight is bitsandbytes 4-bit (``dtype`` its
    compute dtype), which only the fused kernel takes."""
    from . import dispatch

    stages = _stages(x_shape, weight_shape, rank, dtype, adapter_dtype, bias, dropout_p, dora,
                     training, device, quant4)
    return [dispatch.CHOOSER.describe(stage, spec, device) for stage, spec in stages.items()]


def warmup(x_shape, weight_shape, rank: int, *, dtype: torch.dtype = torch.bfloat16,
           adapter_dtype: torch.dtype | None = None, bias: bool = True, dropout_p: float = 0.0,
           dora: bool = False, training: bool = True, device="cuda",
           quant4: bool = False) -> list[Explanation]:
    """Choose the implementation of every linear stage of one layer call (timing the
    candidates of keys not chosen yet), then run the op forward (and backward when
    ``training``) once on random data, so that every Triton kernel is compiled and
    autotuned. Call it, outside CUDA-graph capture, for each distinct layer shape before
    capturing (or run the model once). ``quant4``: over a bitsandbytes 4-bit weight (a
    random QLoRA-layout one: NF4, blocks of 64, nested absmax; ``dtype`` its compute dtype),
    whose stages have nothing to choose. Returns ``explain``'s answer."""
    from . import dispatch

    generator = torch.Generator(device=device).manual_seed(0)
    stages = _stages(x_shape, weight_shape, rank, dtype, adapter_dtype, bias, dropout_p, dora,
                     training, device, quant4)
    for spec in stages.values():
        if not spec.quant4:
            dispatch.CHOOSER.choose(spec.synthetic(device, generator), spec.impls)
    _run_layer(x_shape, weight_shape, rank, dtype, adapter_dtype or dtype, bias, dropout_p, dora,
               training, device, generator, quant4)
    return explain(x_shape, weight_shape, rank, dtype=dtype, adapter_dtype=adapter_dtype,
                   bias=bias, dropout_p=dropout_p, dora=dora, training=training, device=device,
                   quant4=quant4)


def _run_layer(x_shape, weight_shape, rank, dtype, adapter_dtype, bias, dropout_p, dora,
               training, device, generator, quant4) -> None:
    from ..functional import dora_linear, lora_linear
    from ..ops.quant4 import Quant4Weight

    n, k = weight_shape

    def randn(*shape, dt=dtype, scale=1.0):
        return torch.randn(*shape, generator=generator, device=device, dtype=dt) * scale

    x = randn(*x_shape).requires_grad_(training)
    weight = (Quant4Weight.random((n, k), dtype, device, torch.Generator().manual_seed(0))
              if quant4 else randn(n, k, scale=k ** -0.5))
    b = randn(n) if bias else None
    lora_A = randn(rank, k, dt=adapter_dtype, scale=k ** -0.5).requires_grad_(training)
    lora_B = randn(n, rank, dt=adapter_dtype, scale=0.01).requires_grad_(training)
    kwargs = dict(dropout_p=dropout_p, training=training, seed=0)
    if dora:
        magnitude = (torch.ones(n, device=device) if quant4 else
                     weight.float().norm(dim=1)).requires_grad_(training)
        y = dora_linear(x, weight, b, lora_A, lora_B, 1.0, magnitude, **kwargs)
    else:
        y = lora_linear(x, weight, b, lora_A, lora_B, 1.0, **kwargs)
    if training:
        y.backward(torch.randn(y.shape, generator=generator, device=device, dtype=y.dtype))


def warmup_multi(x_shape, weight: torch.Tensor, bias: torch.Tensor | None, bank, *,
                 training: bool = False) -> None:
    """Run ``multi_lora_linear`` once, outside CUDA-graph capture, on random x of
    ``x_shape`` (``[..., K]``, weight's dtype and device) with its rows spread over the
    adapters ``bank`` holds (an ``AdapterBank``'s loaded slots; forward, and backward when
    ``training``), so that every Triton kernel such a call launches (the gathered decode
    path up to ``GATHER_MAX_M`` rows, the grouped one above, the backward's) is compiled and
    autotuned for this row count. ``weight`` ``[N, K]``, ``bias`` and ``bank`` as
    ``multi_lora_linear`` takes them: call it for each row count (or bucket) a graph will be
    captured with."""
    from ..functional import multi_lora_linear

    packed = bank.packed()
    m = math.prod(x_shape[:-1])
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(*x_shape, generator=generator, device=weight.device, dtype=weight.dtype)
    held = [i for i in range(packed.n) if packed.slots is None or packed.slots.names[i]]
    index = torch.tensor(held or [-1], dtype=torch.int32)[torch.arange(m) % max(len(held), 1)]
    index = index.to(weight.device)
    x.requires_grad_(training)
    y = multi_lora_linear(x, weight, bias, bank, index.view(x_shape[:-1]), training=training,
                          seed=0)
    if training:
        y.backward(torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype))
