"""Light-LoRA files: a frozen down and up projection around a small trainable core.

Key convention, per module ``<m>`` (a dotted path or a kohya-style name):

* ``<m>.lora_down.weight``: frozen down projection ``[m, K]`` (conv: ``[m, C, *kernel]``)
* ``<m>.lora_mid.weight``: trainable core ``[m2, m]`` (always 2-D)
* ``<m>.lora_up.weight``: frozen up projection ``[N, m2]`` (conv: ``[N, m2, 1, 1]``)
* ``<m>.alpha``: optional scalar; the scale is ``alpha / m`` (without it, alpha follows the
  kohya rule: ``ss_network_alpha``, else ``m``)

so ``delta W = scale * up @ mid @ down``. Loading folds the core into the down projection,
``A = mid @ down`` ``[m2, K]`` and ``B = up``, with alpha rescaled to ``scale * m2`` so the
scale is unchanged. A 4-D ``lora_mid`` (LyCORIS' Tucker-decomposed convolution) is refused.
"""
from __future__ import annotations

import torch

from .errors import AdapterShapeError


def fold_core(down: torch.Tensor, mid: torch.Tensor, where: str) -> torch.Tensor:
    """``mid @ down`` computed in float32, returned in ``down``'s dtype, shaped ``[m2, *down.shape[1:]]``.

    ``where`` names the keys in the error raised when the shapes do not chain.
    """
    if mid.dim() != 2 or down.dim() < 2 or mid.shape[1] != down.shape[0]:
        raise AdapterShapeError(
            f"{where}: lora_mid {list(mid.shape)} must be 2-D [m2, m] and chain with "
            f"lora_down {list(down.shape)} [m, ...]")
    folded = mid.float() @ down.float().flatten(1)
    return folded.reshape(mid.shape[0], *down.shape[1:]).to(down.dtype)
