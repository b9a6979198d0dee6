"""In-memory adapter: one layer per adapted module, whatever the file format.

A layer is an :class:`AdapterLayer` (LoRA, ``kind == "lora"``) or a LyCORIS layer
(:mod:`fastlora.io.lycoris`: ``"loha"``, ``"lokr"``). Every kind has ``kind``, ``rank``,
``alpha``, ``scale``, ``out_features``, ``in_shape`` (the changed weight is
``[out_features, *in_shape]``), ``dtype``, ``magnitude``, ``bias``, ``rslora``, ``is_conv``,
``delta()`` and ``num_parameters()``; only LoRA layers have ``A`` and ``B``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .summary import dtype_name, one_line, shape_text, summary_text

FORMATS = ("peft", "diffusers", "kohya", "light-lora", "lycoris")
"""Values of :attr:`Adapter.source_format`; ``peft``, ``diffusers`` and ``kohya`` can be written."""


@dataclass(repr=False)
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

    kind = "lora"

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.A.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def is_conv(self) -> bool:
        return self.A.dim() > 2

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` in float32, shaped like the base weight: ``[N, K]`` or ``[N, C, *kernel]``."""
        flat = self.B.float() @ self.A.float().flatten(1)
        return (flat * self.scale).reshape(self.B.shape[0], *self.A.shape[1:])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B, self.magnitude, self.bias) if t is not None]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def __repr__(self) -> str:
        extras = "".join(f", {n}" for n, t in (("rsLoRA", self.rslora), ("DoRA", self.magnitude is not None),
                                                 ("lora_B bias", self.bias is not None)) if t)
        return (f"AdapterLayer(rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:.6g}, "
                f"A={shape_text(self.A)}, B={shape_text(self.B)}, {dtype_name(self.dtype)}{extras})")


def alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
    """The alpha giving ``scale`` at ``rank``: ``scale * r`` (``scale * sqrt(r)`` with rsLoRA)."""
    return scale * (math.sqrt(rank) if rslora else rank)


@dataclass(repr=False)
class Adapter:
    """A loaded adapter.

    ``layers`` maps a module name to its layer: a PEFT-like module path relative to the base
    model (``model.layers.0.self_attn.q_proj``; a pipeline's layers carry their component prefix
    such as ``unet.``), or kohya's underscore name when it could not be mapped.
    ``pipeline``: the names are ``<component>.<path>`` over a diffusers pipeline's components
    (PEFT output is then one directory per component, diffusers output configured per
    component); ``load_adapter`` sets it on evidence of a pipeline only, never on a name's first
    segment alone (GPT-2's modules are ``transformer.h.0...``).
    ``config`` holds the checked, format-independent settings that saving passes on
    (``base_model_name_or_path``, ``task_type``, ``fan_in_fan_out``). ``metadata`` is the
    file's raw header metadata, kept for display only. ``skipped`` lists the file's tensor keys
    that are not adapter weights (left out with a warning). ``print(adapter)`` shows a summary.
    """

    layers: dict[str, Any]
    source_format: str
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    pipeline: bool = False

    @property
    def use_dora(self) -> bool:
        return any(layer.magnitude is not None for layer in self.layers.values())

    @property
    def use_rslora(self) -> bool:
        return bool(self.layers) and all(layer.rslora for layer in self.layers.values())

    def num_parameters(self) -> int:
        return sum(layer.num_parameters() for layer in self.layers.values())

    def __repr__(self) -> str:
        return f"Adapter({one_line(self)})"

    def __str__(self) -> str:
        return summary_text(self)
