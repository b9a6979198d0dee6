"""Cores between a down and an up projection, folded into the down projection on load.

Per module ``<m>`` (kohya-style keys), ``<m>.lora_down.weight`` ``[m, ...]``,
``<m>.lora_mid.weight`` and ``<m>.lora_up.weight`` ``[N, m2]`` (conv: ``[N, m2, 1, 1]``):

* Light-LoRA: a trainable 2-D core ``[m2, m]`` between a frozen down ``[m, K]`` (conv:
  ``[m, C, *kernel]``) and up projection;
* LyCORIS LoCon with Tucker decomposition: a convolution core ``[m2, m, *kernel]`` between
  1x1 down ``[m, C, 1, 1]`` and up convolutions.

Either way ``delta W = scale * up @ mid @ down`` with ``scale = alpha / m`` (no ``alpha``: m),
and the fold ``A = mid @ down`` (``[m2, *down.shape[1:]]``, or ``[m2, C, *kernel]`` for a
Tucker core) with ``B = up`` is exact; alpha is rescaled to ``scale * m2`` so the scale holds.
"""
from __future__ import annotations

import torch

from .errors import AdapterShapeError


def fold_core(down: torch.Tensor, mid: torch.Tensor, where: str) -> torch.Tensor:
    """``mid @ down`` computed in float32, returned in ``down``'s dtype.

    ``where`` names the keys in the error raised when the shapes do not chain.
    """
    if mid.dim() == 2 and down.dim() >= 2 and mid.shape[1] == down.shape[0]:
        folded = mid.float() @ down.float().flatten(1)
        return folded.reshape(mid.shape[0], *down.shape[1:]).to(down.dtype)
    tucker = mid.dim() > 2 and down.dim() == mid.dim() and mid.shape[1] == down.shape[0] \
        and all(s == 1 for s in down.shape[2:])
    if not tucker:
        raise AdapterShapeError(
            f"{where}: lora_mid {list(mid.shape)} does not chain with lora_down {list(down.shape)}: expected a "
            "2-D core [m2, m] after lora_down [m, ...], or a Tucker core [m2, m, *kernel] after lora_down "
            "[m, C, 1, ...]")
    return torch.einsum("ij...,jc->ic...", mid.float(), down.float().flatten(1)).to(down.dtype)
