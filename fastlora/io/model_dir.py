"""A base model's module tree from a local transformers or diffusers directory, to bind adapter
names (``load_adapter(..., base_model=...)``, the command line's ``--base-model DIR``).

The model is built from its ``config.json`` on the meta device: no weights are read and no
memory is taken, whatever its size. A diffusers pipeline directory (``model_index.json``)
gives an ``nn.ModuleDict`` of its model components (``unet``, ``text_encoder``, ...), so names
bind as ``unet.down_blocks...``. Remote code is never run. Needs ``transformers`` and, for
diffusers directories, ``diffusers``.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterFormatError
from .files import read_json

_LIBRARIES = ("diffusers", "transformers")


def load_model_dir(path: str | os.PathLike) -> nn.Module:
    """The model (or pipeline components) of directory ``path``, on the meta device."""
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(20, "not a model directory", str(path))
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        components = {name: _build(path / name, entry[1], entry[0]) for name, entry in index.items()
                      if isinstance(entry, list) and len(entry) == 2 and entry[0] in _LIBRARIES
                      and (path / name / "config.json").is_file()}
        if not components:
            raise AdapterFormatError(f"{path}: model_index.json names no diffusers or transformers model with a "
                                     "config.json")
        return nn.ModuleDict(components)
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        if "_diffusers_version" in config:
            return _build(path, config.get("_class_name"), "diffusers")
        return _build(path, None, "transformers")
    raise AdapterFormatError(f"{path}: not a transformers or diffusers model directory "
                             "(no config.json or model_index.json)")


def _build(path: Path, class_name: str | None, library: str) -> nn.Module:
    try:
        module = importlib.import_module(library)
    except ImportError as e:
        raise AdapterFormatError(f"{path}: reading a {library} model needs the {library} package "
                                 f"(pip install {library})") from e
    try:
        with torch.device("meta"):
            if library == "diffusers":
                cls = getattr(module, class_name or "", None)
                if cls is None:
                    raise AdapterFormatError(f"{path}: unknown diffusers model class {class_name!r}")
                return cls.from_config(cls.load_config(path))
            config = module.AutoConfig.from_pretrained(path)
            name = class_name or next(iter(getattr(config, "architectures", None) or []), None)
            cls = getattr(module, name, None) if name else None
            return cls(config) if cls is not None else module.AutoModel.from_config(config)
    except AdapterFormatError:
        raise
    except Exception as e:  # the libraries raise many types for configs they cannot build
        raise AdapterFormatError(f"{path}: could not build the {library} model from its config ({e})") from e
