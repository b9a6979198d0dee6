"""Errors raised while reading, checking or writing adapter files.

Every error is an :class:`AdapterFormatError` (a ``ValueError``); messages start with the
file (or ``<state dict>``) and name the tensor key or metadata key at fault. A missing path
raises ``FileNotFoundError``.
"""
from __future__ import annotations


class AdapterFormatError(ValueError):
    """The file is unreadable, truncated, of an unknown layout, or its metadata is invalid."""


class AdapterShapeError(AdapterFormatError):
    """Tensor shapes disagree: lora_A vs lora_B ranks, the config's ranks, or the base model."""


class NonFiniteWeightError(AdapterFormatError):
    """A tensor (or alpha) holds NaN or Inf."""


class AdapterSizeError(AdapterFormatError):
    """Building a tensor from the adapter (a LyCORIS layer's full change, the factors of its
    conversion into LoRA) would exceed ``fastlora.io.lycoris.MAX_ELEMENTS`` elements."""


class UnsafeFileError(AdapterFormatError):
    """A pickle-based file (``.bin``, ``.pt``, ...) was given without ``allow_pickle=True``."""


class SkippedTensorsWarning(UserWarning):
    """A file held tensors that are not adapter weights (an embedded textual inversion, ``ss_*``
    metadata tensors, ...); the adapter was loaded without them."""
