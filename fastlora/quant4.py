"""``Quant4Weight``: a bitsandbytes 4-bit weight (NF4 / FP4, plain or double-quantized absmax)
as fastlora reads it, checked before any launch. bitsandbytes itself is only imported to
turn a view back into its ``QuantState`` (the reference's dequantization).

Layout (bitsandbytes 0.50): ``Params4bit.data`` is the packed weight, ``[ceil(N*K / 2), 1]``
uint8 (or the same bytes viewed as ``quant_storage``), two codes per byte over W ``[N, K]``
flattened row-major; ``quant_state.shape`` is ``[N, K]``; the scales are per block of
``blocksize`` flat elements (see ``fastlora.kernels.quant4`` for the exact packing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import checks


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
        No copy, no host synchronization."""
        state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError("the 4-bit weight has no quant_state: bitsandbytes quantizes a "
                             "Params4bit when it moves to its device (e.g. .cuda())")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("the 4-bit weight is in bitsandbytes' CPU inference packing "
                             "(packing_format_for_cpu, set by an eval-mode Linear4bit forward "
                             "on CPU), not the standard layout fastlora reads")
        if not weight.is_contiguous():
            raise ValueError("the packed 4-bit data must be contiguous")
        shape = tuple(int(s) for s in state.shape) if state.shape is not None else ()
        nested = {}
        if getattr(state, "nested", False):
            nested = dict(absmax2=state.state2.absmax.reshape(-1),
                          code2=state.state2.code.reshape(-1), offset=state.offset.reshape(1),
                          blocksize2=int(state.state2.blocksize))
        # a view of the parameter itself (not .data): it shares the parameter's version
        # counter, so an in-place write to the packed codes is seen by fastlora.cache
        return cls(data=_bytes(weight.view(-1)), absmax=state.absmax.reshape(-1), shape=shape,
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
        from .kernels.quant4 import Quant4Args

        return Quant4Args.from_parts(*self.op_args(), self.compute_dtype or self.dtype)

    def op_args(self) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """What ``fastlora._ops`` takes for this weight: (packed data, [absmax, code book
        (+ absmax2, code2, offset when nested)], [N, K, blocksize, blocksize2]); the code
        book is fastlora's fp32 copy of bitsandbytes' on the weight's device (imports the
        kernels)."""
        from .kernels.quant4 import code_book

        quant = [self.absmax, code_book(self.quant_type, self.device)]
        if self.nested:
            quant += [self.absmax2, self.code2, self.offset]
        return self.data, quant, [*self.shape, self.blocksize, self.blocksize2]

    def to_bnb(self, dtype: torch.dtype | None = None):
        """(packed data ``[ceil(N*K / 2), 1]`` uint8, bitsandbytes ``QuantState``) for
        ``bitsandbytes.functional.dequantize_4bit``, which then returns ``dtype`` (default
        the weight's own)."""
        from bitsandbytes.functional import QuantState, get_4bit_type

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2,
                                dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=torch.Size(self.shape),
                           code=get_4bit_type(self.quant_type, device=self.device),
                           blocksize=self.blocksize, quant_type=self.quant_type,
                           dtype=dtype or self.dtype,
                           offset=self.offset.reshape(()) if self.nested else None, state2=state2)
        return self.data.view(-1, 1), state
