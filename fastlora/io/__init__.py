"""Adapter files: load and save PEFT, diffusers, kohya and Light-LoRA LoRA formats; reduce ranks.

``load_adapter(path_or_state_dict)`` returns an :class:`Adapter` (one :class:`AdapterLayer`
per module: A ``[r, K]`` or ``[r, C, *kernel]``, B ``[N, r]``, alpha, rank, scale, optional
DoRA magnitude and lora_B bias); ``save_adapter(adapter, path, format)`` writes it back;
``resize(adapter, ...)`` lowers ranks by SVD. ``fastlora.io.cli.main`` is the command line.
"""
from .adapter import FORMATS, Adapter, AdapterLayer
from .errors import AdapterFormatError, AdapterShapeError, NonFiniteWeightError, UnsafeFileError
from .load import load_adapter
from .resize import METHODS, LayerResize, resize
from .save import SAVE_FORMATS, save_adapter

__all__ = [
    "FORMATS", "METHODS", "SAVE_FORMATS", "Adapter", "AdapterFormatError", "AdapterLayer", "AdapterShapeError",
    "LayerResize", "NonFiniteWeightError", "UnsafeFileError", "load_adapter", "resize", "save_adapter",
]
