"""Argument checks of the public ops (``lora_linear``, ``dora_linear``, ``dora_weight_norm``,
``multi_lora_linear``) and of ``fastlora.serve``'s counts: each raises a clear error naming
the argument and the problem before any work.

``kernel=True`` adds what only the Triton kernels require (fp16, bf16 or fp32 tensors).
Nothing here synchronizes with a CUDA device: values are read only from CPU tensors.
"""
from __future__ import annotations

import math
import numbers

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT4_TYPES = ("nf4", "fp4")
QUANT4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit's
FLOAT32_MAX = torch.finfo(torch.float32).max


def check_float(name: str, t: torch.Tensor, kernel: bool) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; a floating-point tensor is required")
    if kernel and t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}, which the Triton kernels do not support "
                        "(float16, bfloat16, float32); use FASTLORA_BACKEND=torch")


def check_devices(**named) -> None:
    """Every given tensor (None: absent) is a tensor, and all are on one device."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def check_positive_int(name: str, value) -> None:
    """A count (``max_batch``, ``slots``, ...): an int, at least 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def check_scaling(scaling, name: str = "scaling") -> None:
    """A real number the kernels can take: finite in float32 (their scale's dtype)."""
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise TypeError(f"{name} must be a real number, got {type(scaling).__name__}")
    if not abs(float(scaling)) <= FLOAT32_MAX:  # NaN fails too
        raise ValueError(f"{name} must be finite and within float32's range (the kernels' "
                         f"scale dtype, up to {FLOAT32_MAX:.3g}), got {scaling}")


def check_dropout(dropout_p) -> None:
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def check_random(training, seed, generator) -> None:
    """``training`` a bool; ``seed`` None or an int; ``generator`` None or a
    ``torch.Generator``."""
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")


def check_base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               kernel: bool) -> None:
    """x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None; x and weight share a dtype."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(name, t, kernel)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (features last)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {k} (weight shape {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype "
                        "(outside autocast, as for F.linear)")


def _check_quant4_part(name: str, t, numel: int, dtype: torch.dtype, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"4-bit {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != numel:
        raise ValueError(f"4-bit {name} has {t.numel()} elements but {what} needs {numel}: "
                         "the quant state does not match the packed weight")
    if t.dtype != dtype:
        raise TypeError(f"4-bit {name} has dtype {t.dtype}, expected {dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"4-bit {name} must be a contiguous 1-D tensor, got shape "
                         f"{tuple(t.shape)} and strides {t.stride()}")


def check_quant4(w) -> None:
    """A ``Quant4Weight``'s layout: quant type and blocksizes fastlora reads, the packed data
    and every scale sized for its shape, dtypes, one device."""
    if w.quant_type not in QUANT4_TYPES:
        raise ValueError(f"unsupported 4-bit quant type {w.quant_type!r}: fastlora reads "
                         f"{', '.join(map(repr, QUANT4_TYPES))}")
    if w.blocksize not in QUANT4_BLOCKSIZES:
        raise ValueError(f"unsupported 4-bit blocksize {w.blocksize!r}: bitsandbytes uses "
                         f"{', '.join(map(str, QUANT4_BLOCKSIZES))}")
    shape = w.shape
    if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"quant state shape {list(shape)} is not a 2-D weight shape "
                         "[out_features, in_features]")
    numel = shape[0] * shape[1]
    blocks = math.ceil(numel / w.blocksize)
    _check_quant4_part("packed data", w.data, (numel + 1) // 2, torch.uint8,
                       f"(N*K + 1) // 2 for shape {list(shape)}")
    nested = w.absmax2 is not None
    if nested != (w.code2 is not None) or nested != (w.offset is not None):
        raise ValueError("a double-quantized absmax needs absmax2, code2 and offset together")
    _check_quant4_part("absmax", w.absmax, blocks, torch.uint8 if nested else torch.float32,
                       f"the blocks of {list(shape)} at blocksize {w.blocksize}"
                       + (" (uint8 codes: the absmax is double-quantized)" if nested else ""))
    if nested:
        if w.blocksize2 not in QUANT4_BLOCKSIZES:
            raise ValueError(f"unsupported nested blocksize {w.blocksize2!r}: bitsandbytes "
                             f"uses {', '.join(map(str, QUANT4_BLOCKSIZES))}")
        _check_quant4_part("nested absmax", w.absmax2, math.ceil(blocks / w.blocksize2),
                           torch.float32, f"{blocks} blocks at nested blocksize {w.blocksize2}")
        _check_quant4_part("nested code", w.code2, 256, torch.float32, "an 8-bit code book")
        _check_quant4_part("nested offset", w.offset, 1, torch.float32, "one value")
    for name, dt in (("dtype", w.dtype), ("compute_dtype", w.compute_dtype or w.dtype)):
        if dt not in KERNEL_DTYPES:
            raise TypeError(f"4-bit weight {name} {dt} is not float16, bfloat16 or float32")
    devices = {name: t.device for name, t in w.tensors().items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"4-bit weight parts are on different devices: {devices}")


def check_quant4_device(w, device: torch.device, what: str = "x") -> None:
    """A ``Quant4Weight`` lives on ``device`` (that of ``what``)."""
    if torch.device(device) != w.device:
        raise ValueError(f"the 4-bit weight is on {w.device} but {what} is on "
                         f"{torch.device(device)}")


def check_quant4_base(x: torch.Tensor, weight, bias: torch.Tensor | None, kernel: bool) -> None:
    """x ``[..., K]`` and bias ``[N]`` or None over a 4-bit ``Quant4Weight`` W ``[N, K]``
    (its quant state's shape) on x's device; x may have any float dtype (it is cast to the
    compute dtype, as bitsandbytes' ``Linear4bit`` does)."""
    for name, t in (("x", x), ("bias", bias)):
        if t is not None:
            check_float(name, t, kernel)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (features last)")
    weight.check_device(x.device)
    n, k = weight.shape
    if x.shape[-1] != k:
        if x.shape[-1] == n:
            raise ValueError(
                f"the 4-bit weight was quantized from a [K, N] tensor (quant state shape "
                f"[{n}, {k}], x has {n} features): bitsandbytes' deprecated orientation; "
                "re-quantize the weight as [out_features, in_features]")
        raise ValueError(f"x has {x.shape[-1]} features but the 4-bit weight expects {k} "
                         f"(quant state shape [{n}, {k}])")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def check_adapter(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, kernel: bool) -> None:
    """lora_A ``[r, K]`` and lora_B ``[N, r]`` (r >= 1, one float dtype) fit weight ``[N, K]``
    (a tensor or a 4-bit ``Quant4Weight``)."""
    check_float("lora_A", lora_A, kernel)
    check_float("lora_B", lora_B, kernel)
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, {k}], got shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or lora_B.shape[0] != n:
        raise ValueError(f"lora_B must be [{n}, r], got shape {tuple(lora_B.shape)}")
    if lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"rank mismatch: lora_A has rank {lora_A.shape[0]}, lora_B has rank {lora_B.shape[1]}")
    if lora_A.shape[0] == 0:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} have "
                         "rank 0: the LoRA rank must be at least 1")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must have the same dtype")


def check_lora(x, weight, bias, lora_A, lora_B, scaling, dropout_p, kernel: bool) -> None:
    """The arguments of ``lora_linear`` / ``dora_linear`` (devices are checked before autocast);
    weight dense or a 4-bit ``Quant4Weight``."""
    if isinstance(weight, torch.Tensor):
        check_base(x, weight, bias, kernel)
    else:
        check_quant4_base(x, weight, bias, kernel)
    check_adapter(weight, lora_A, lora_B, kernel)
    check_scaling(scaling)
    check_dropout(dropout_p)


def check_magnitude(magnitude: torch.Tensor, weight: torch.Tensor, kernel: bool) -> None:
    check_float("magnitude", magnitude, kernel)
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude must have shape ({weight.shape[0]},), got {tuple(magnitude.shape)}")


def check_weight_norm(weight_norm: torch.Tensor, n: int, name: str = "weight_norm") -> None:
    """A DoRA row norm ``||W + s B A||`` ``[N]`` (float, as ``dora_weight_norm`` gives it),
    every entry finite and positive (it divides the magnitude). Values are read only from a
    CPU tensor, on the host (as ``check_index``); a CUDA norm's are not (no device sync)."""
    if not isinstance(weight_norm, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight_norm).__name__}")
    check_float(name, weight_norm, kernel=False)
    if tuple(weight_norm.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one norm per output row), got "
                         f"{tuple(weight_norm.shape)}")
    if weight_norm.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ~((weight_norm > 0) & (weight_norm < math.inf))  # NaN fails both
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{i}] is {weight_norm[i].item()}: DoRA's row norm "
                             "||W + s B A|| must be finite and positive (it divides the magnitude)")


def check_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling,
               kernel: bool) -> None:
    """The arguments of ``dora_weight_norm``: weight ``[N, K]`` float (or a 4-bit
    ``Quant4Weight`` on the adapter's device), the adapter fitting it."""
    if isinstance(weight, torch.Tensor):
        check_devices(weight=weight, lora_A=lora_A, lora_B=lora_B)
        check_float("weight", weight, kernel)
    else:
        check_devices(lora_A=lora_A, lora_B=lora_B)
        weight.check_device(lora_A.device, "lora_A")
    check_adapter(weight, lora_A, lora_B, kernel)
    check_scaling(scaling)


def check_multi(x, weight, bias, bank, kernel: bool) -> None:
    """The arguments of ``multi_lora_linear`` besides the index: the base and a
    ``PackedAdapters`` that fits it, every bank tensor on x's device."""
    check_base(x, weight, bias, kernel)
    check_float("bank A", bank.A, kernel)
    check_float("bank B", bank.B, kernel)
    n, k = weight.shape
    if bank.A.shape[1] != k or bank.B.shape[1] != n:
        raise ValueError(f"bank does not fit the base layer [{n}, {k}]: A is "
                         f"{list(bank.A.shape)} (needs [S, {k}]), B {list(bank.B.shape)} "
                         f"(needs [S, {n}])")
    if bank.A.dtype != bank.B.dtype:
        raise TypeError(f"bank A ({bank.A.dtype}) and B ({bank.B.dtype}) must share a dtype")
    tensors = (bank.A, bank.B, bank.offsets, bank.ranks, bank.scales, bank.magnitude,
               bank.weight_norm, bank.is_dora, bank.dropout)
    devices = {t.device for t in tensors if t is not None}
    if devices != {x.device}:
        raise ValueError(f"bank tensors are on {sorted(map(str, devices))}, x on {x.device}")


def check_index(index, n: int, device: torch.device, m: int | None = None) -> torch.Tensor:
    """adapter_index: an integer tensor (signed, or uint8/uint16/uint32, whose values all fit
    int64) on x's device, each entry in ``-1 .. n - 1``; with ``m``, one entry per row of x.
    Returns it flattened, unsigned dtypes widened to int64. The range is checked on the host
    for CPU tensors; on a GPU by a device-side assert (no host sync; it surfaces at the next
    synchronization)."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"adapter_index must be an integer tensor, got {type(index).__name__}")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"adapter_index must be an integer tensor, got {index.dtype}")
    if index.dtype == torch.uint64:
        raise TypeError("adapter_index has dtype uint64, whose values may not fit int64: use a "
                        "signed integer dtype or uint8/uint16/uint32")
    if m is not None and index.numel() != m:
        raise ValueError(f"adapter_index has {index.numel()} entries for {m} rows of x "
                         f"(shape {tuple(index.shape)}): one adapter per row is needed")
    if index.device != device:
        raise ValueError(f"adapter_index is on {index.device}, x on {device}")
    flat = index.reshape(-1)
    if flat.dtype in (torch.uint8, torch.uint16, torch.uint32):
        flat = flat.long()
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = flat[(flat < -1) | (flat >= n)]
        if bad.numel():
            raise ValueError(f"adapter_index holds {bad[0].item()}, outside -1 .. {n - 1} "
                             f"(the bank has {n} adapters; -1 = base only)")
    elif flat.numel():
        torch._assert_async(((flat >= -1) & (flat < n)).all(),
                            f"fastlora.multi_lora_linear: adapter_index outside -1 .. {n - 1}")
    return flat
