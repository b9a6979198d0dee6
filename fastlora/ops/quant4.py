"""``Quant4Weight``: a bitsandbytes 4-bit weight (NF4 / FP4, plain or double-quantized absmax)
as fastlora reads it, checked before any launch, its code books, and its decode in PyTorch
(``dequantize``: the PyTorch path's and the reference's; the kernels decode the same values
tile by tile). bitsandbytes itself is never imported here.

Layout (bitsandbytes 0.50): ``Params4bit.data`` is the packed weight, ``[ceil(N*K / 2), 1]``
uint8 (or the same bytes viewed as ``quant_storage``), two codes per byte over W ``[N, K]``
flattened row-major; ``quant_state.shape`` is ``[N, K]``; the scales are per block of
``blocksize`` flat elements (see ``fastlora.kernels.quant4`` for the exact packing).
bitsandbytes 0.50's own CPU ``dequantize_4bit`` is wrong where a block straddles two rows
and K is a multiple of 16 (K = 80 at blocksize 64, K = 128 at 256): fastlora never uses it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import checks


# The code books, in code order: NF4 (normal quantiles) and FP4 (sign bit, 2 exponent bits,
# 1 mantissa bit, in bitsandbytes' bias), both scaled to [-1, 1] in fp32.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
_CODE_BOOKS: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_book(quant_type: str, device) -> torch.Tensor:
    """The 16 code values of ``quant_type`` ("nf4" or "fp4"), fp32 on ``device`` (cached)."""
    device = torch.device(device)
    key = (quant_type, device)
    if key not in _CODE_BOOKS:
        if quant_type == "nf4":
            values = torch.tensor(_NF4, dtype=torch.float32)
        elif quant_type == "fp4":
            mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
            values = torch.cat([mags, 0.0 - mags]) / 12.0  # codes 8..15: the sign bit set
        else:
            raise ValueError(f"no 4-bit code book {quant_type!r}; known: 'nf4', 'fp4'")
        _CODE_BOOKS[key] = values.to(device)
    return _CODE_BOOKS[key]


class UnreadableLayout(ValueError):
    """A bitsandbytes 4-bit weight in a state fastlora does not read, though bitsandbytes
    computes with it (not quantized yet, repacked for its CPU inference, not contiguous).
    A quant state that fails :func:`fastlora.ops.checks.check_quant4` is no such case: it is
    wrong for bitsandbytes too, and raises its own error."""


def is_bnb_4bit(weight) -> bool:
    """True for a bitsandbytes ``Params4bit`` (read without importing bitsandbytes)."""
    return (isinstance(weight, torch.Tensor) and hasattr(weight, "quant_state")
            and type(weight).__module__.startswith("bitsandbytes"))


def as_quant4(weight, compute_dtype: torch.dtype) -> "Quant4Weight | None":
    """A 4-bit ``weight`` (``Quant4Weight`` or bitsandbytes ``Params4bit``) as a
    ``Quant4Weight`` with its compute dtype set (its own, else ``compute_dtype``); None for
    any other weight."""
    if isinstance(weight, Quant4Weight):
        if weight.compute_dtype is not None:
            return weight
        return dataclasses.replace(weight, compute_dtype=compute_dtype)
    if is_bnb_4bit(weight):
        return Quant4Weight.from_bnb(weight, compute_dtype=compute_dtype)
    return None


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as flat uint8 (bitsandbytes' ``quant_storage`` may be a
    wider dtype holding the same bytes)."""
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _flat(t):
    """A quant-state tensor flattened to 1-D; anything else as it is, for the checks to name."""
    return t.reshape(-1) if isinstance(t, torch.Tensor) else t


@dataclass(frozen=True, eq=False)
class Quant4Weight:
    """W ``[N, K]`` (``shape``) packed by bitsandbytes: data uint8 ``[ceil(N*K / 2)]``,
    absmax ``[ceil(N*K / blocksize)]`` (fp32, or uint8 codes when nested); nested absmax:
    absmax2 fp32 ``[ceil(blocks / blocksize2)]``, code2 fp32 ``[256]``, offset fp32 ``[1]``.
    ``dtype`` is the quantized weight's own dtype (``quant_state.dtype``); ``compute_dtype``
    the layer's matmul dtype (bitsandbytes' ``Linear4bit.compute_dtype``; None: x's dtype).

    Construction checks every size, dtype and device, so a mismatch raises here, naming it.
    """
    data: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    quant_type: str
    blocksize: int
    dtype: torch.dtype = torch.float32
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 256
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        checks.check_quant4(self)

    @classmethod
    def random(cls, shape: tuple[int, int], dtype: torch.dtype, device,
               generator: torch.Generator | None = None) -> "Quant4Weight":
        """A QLoRA-layout 4-bit weight ``[N, K]`` (NF4, blocks of 64, absmax double-quantized
        in blocks of 256) of random codes and scales, compute dtype ``dtype``, for timing and
        warm-up (a kernel's work does not depend on the values); ``generator`` on the CPU."""
        import math

        n, k = shape
        blocks = math.ceil(n * k / 64)

        def codes(size):
            return torch.randint(0, 256, (size,), generator=generator,
                                 dtype=torch.uint8).to(device)

        def uniform(size):
            return torch.rand(size, generator=generator).to(device)

        return cls(data=codes(math.ceil(n * k / 2)), absmax=codes(blocks), shape=(n, k),
                   quant_type="nf4", blocksize=64, absmax2=uniform(math.ceil(blocks / 256)) * 0.01
                   + 0.01, code2=uniform(256) * 2 - 1, offset=uniform(1), blocksize2=256,
                   dtype=dtype, compute_dtype=dtype)

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, quant_state=None,
                 compute_dtype: torch.dtype | None = None) -> "Quant4Weight":
        """The view of a bitsandbytes ``Params4bit`` (its own ``quant_state``), or of packed
        data with the ``QuantState`` that ``bitsandbytes.functional.quantize_4bit`` returned.
        No copy, no host synchronization. Raises :class:`UnreadableLayout` for a layout
        fastlora does not read, and the checks' ``ValueError`` / ``TypeError`` for a quant
        state that does not fit its data."""
        state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if state is None:
            raise UnreadableLayout("the 4-bit weight has no quant_state: bitsandbytes quantizes "
                                   "a Params4bit when it moves to its device (e.g. .cuda())")
        if getattr(state, "packing_format_for_cpu", False):
            raise UnreadableLayout("the 4-bit weight is in bitsandbytes' CPU inference packing "
                                   "(packing_format_for_cpu, set by an eval-mode Linear4bit "
                                   "forward on CPU), not the standard layout fastlora reads")
        if not weight.is_contiguous():
            raise UnreadableLayout("the packed 4-bit data must be contiguous")
        shape = tuple(int(s) for s in state.shape) if state.shape is not None else ()
        nested = {}
        if getattr(state, "nested", False):
            state2 = state.state2
            nested = dict(absmax2=_flat(getattr(state2, "absmax", None)),
                          code2=_flat(getattr(state2, "code", None)), offset=_flat(state.offset),
                          blocksize2=getattr(state2, "blocksize", None))
        # a view of the parameter itself (not .data): it shares the parameter's version
        # counter, so an in-place write to the packed codes is seen by fastlora.ops.cache
        return cls(data=_bytes(weight.view(-1)), absmax=_flat(state.absmax), shape=shape,
                   quant_type=state.quant_type, blocksize=state.blocksize, dtype=state.dtype,
                   compute_dtype=compute_dtype, **nested)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the view by name (the nested ones when present)."""
        named = dict(data=self.data, absmax=self.absmax)
        if self.nested:
            named.update(absmax2=self.absmax2, code2=self.code2, offset=self.offset)
        return named

    def check_device(self, device: torch.device, what: str = "x") -> None:
        """Raise unless the weight lives on ``device`` (that of ``what``)."""
        checks.check_quant4_device(self, device, what)

    def kernel_args(self):
        """The launch metadata of the QUANT4 kernels, W ``[N, K]`` dequantized to the compute
        dtype (imports the kernels)."""
        from ..kernels.descriptors import Quant4

        return Quant4.from_parts(*self.op_args(), self.compute_dtype or self.dtype)

    def op_args(self) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """What ``fastlora.ops.library`` takes for this weight: (packed data, [absmax, code book
        (+ absmax2, code2, offset when nested)], [N, K, blocksize, blocksize2]); the code
        book is fastlora's fp32 copy of bitsandbytes' on the weight's device."""
        quant = [self.absmax, code_book(self.quant_type, self.device)]
        if self.nested:
            quant += [self.absmax2, self.code2, self.offset]
        return self.data, quant, [*self.shape, self.blocksize, self.blocksize2]

    def block_scales(self) -> torch.Tensor:
        """The scale of every quant block, fp32 ``[ceil(N*K / blocksize)]``: absmax, or
        ``code2[absmax] * absmax2[b // blocksize2] + offset`` when nested."""
        if not self.nested:
            return self.absmax
        outer = self.absmax2.repeat_interleave(self.blocksize2)[:self.absmax.numel()]
        return self.code2[self.absmax.long()] * outer + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ``[N, K]`` decoded in PyTorch: ``code_book[code] * scale`` per element in fp32,
        rounded once to ``dtype`` (default the weight's own), as bitsandbytes defines it
        (and its CUDA decode computes; see the module note on its CPU decode)."""
        n, k = self.shape
        numel, blocks = n * k, self.absmax.numel()
        codes = torch.stack((self.data >> 4, self.data & 15), dim=1).reshape(-1).long()
        values = code_book(self.quant_type, self.device)[codes]
        values = torch.nn.functional.pad(values, (0, blocks * self.blocksize - values.numel()))
        w = values.view(blocks, self.blocksize) * self.block_scales()[:, None]
        return w.reshape(-1)[:numel].view(n, k).to(dtype or self.dtype)
