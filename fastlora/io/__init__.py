"""Adapter files: load PEFT, diffusers, kohya, Light-LoRA and LyCORIS (LoCon, LoHa, LoKr) files;
save PEFT, diffusers and kohya LoRA files; reduce ranks; turn LoHa/LoKr into LoRA.

``load_adapter(path_or_state_dict)`` returns an :class:`Adapter` (one layer per module: an
:class:`AdapterLayer` with A ``[r, K]`` or ``[r, C, *kernel]``, B ``[N, r]``, alpha, rank,
scale, optional DoRA magnitude and lora_B bias; or a :class:`LohaLayer` / :class:`LokrLayer`);
``save_adapter(adapter, path, format)`` writes it back; ``resize(adapter, ...)`` lowers ranks
by SVD and ``to_lora(adapter, ...)`` turns LyCORIS layers into LoRA. ``fastlora.io.cli.main``
is the command line. This package depends on nothing else in fastlora.
"""
from .adapter import FORMATS, Adapter, AdapterLayer
from .errors import (
    AdapterFormatError,
    AdapterShapeError,
    AdapterSizeError,
    NonFiniteWeightError,
    SkippedTensorsWarning,
    UnsafeFileError,
)
from .load import load_adapter
from .lycoris import LohaLayer, LokrLayer
from .resize import METHODS, LayerResize, resize, to_lora
from .save import SAVE_FORMATS, save_adapter

__all__ = [
    "FORMATS", "METHODS", "SAVE_FORMATS", "Adapter", "AdapterFormatError", "AdapterLayer", "AdapterShapeError",
    "AdapterSizeError", "LayerResize", "LohaLayer", "LokrLayer", "NonFiniteWeightError", "SkippedTensorsWarning",
    "UnsafeFileError", "load_adapter", "resize", "save_adapter", "to_lora",
]
