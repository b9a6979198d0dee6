"""In-memory adapter: one :class:`AdapterLayer` per adapted module, whatever the file format."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

FORMATS = ("peft", "diffusers", "kohya", "light-lora")
"""Values of :attr:`Adapter.source_format`; all but ``light-lora`` can be written."""


@dataclass
class AdapterLayer:
    """LoRA factors of one module: ``delta W = scale * B @ A``.

    ``A``: ``[r, K]`` for a linear layer, ``[r, C, *kernel]`` for a convolution (PEFT's
    ``lora_A`` / kohya's ``lora_down``). ``B``: ``[N, r]`` (a conv's 1x1 ``lora_B`` is stored
    squeezed). ``magnitude``: DoRA magnitude ``[N]`` or None. ``bias``: PEFT's ``lora_B.bias``
    ``[N]`` or None. Tensors keep the file's floating dtype; ``alpha`` is a Python float.
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    rslora: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def is_conv(self) -> bool:
        return self.A.dim() > 2

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` in float32, shaped like the base weight: ``[N, K]`` or ``[N, C, *kernel]``."""
        flat = self.B.float() @ self.A.float().flatten(1)
        return (flat * self.scale).reshape(self.B.shape[0], *self.A.shape[1:])

    def num_parameters(self) -> int:
        extra = [t.numel() for t in (self.magnitude, self.bias) if t is not None]
        return self.A.numel() + self.B.numel() + sum(extra)


def alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
    """The alpha giving ``scale`` at ``rank``: ``scale * r`` (``scale * sqrt(r)`` with rsLoRA)."""
    return scale * (math.sqrt(rank) if rslora else rank)


@dataclass
class Adapter:
    """A loaded adapter.

    ``layers`` maps a module name to its factors: a PEFT-like module path relative to the base
    model (``model.layers.0.self_attn.q_proj``; diffusers files keep their component prefix such
    as ``transformer.``), or kohya's underscore name when it could not be mapped.
    ``config`` holds the checked, format-independent settings that saving passes on
    (``base_model_name_or_path``, ``task_type``, ``fan_in_fan_out``). ``metadata`` is the
    file's raw header metadata, kept for display only.
    """

    layers: dict[str, AdapterLayer]
    source_format: str
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def use_dora(self) -> bool:
        return any(layer.magnitude is not None for layer in self.layers.values())

    @property
    def use_rslora(self) -> bool:
        return bool(self.layers) and all(layer.rslora for layer in self.layers.values())

    def num_parameters(self) -> int:
        return sum(layer.num_parameters() for layer in self.layers.values())
