"""Finite values: the one check that refuses NaN or Inf in an adapter's tensors and numbers,
for the file reader and for ``fastlora.adapters.bank`` (which takes adapters from tensors too)."""
from __future__ import annotations

import math
import numbers

import torch

from .errors import NonFiniteWeightError


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ``NonFiniteWeightError`` naming ``what`` if ``tensor`` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteWeightError(f"{what} holds NaN or Inf")


def finite_number(value, what: str) -> float:
    """``value`` (a real number, not a bool) as a float; NaN or Inf raise
    ``NonFiniteWeightError`` naming ``what``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteWeightError(f"{what} holds NaN or Inf")
    return value
