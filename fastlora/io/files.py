"""Reading and writing the raw contents of adapter files: tensors, header metadata, PEFT config.

Only safetensors is read by default. Pickle-based files (``.bin``, ``.pt``, ``.pth``,
``.ckpt``, or anything starting like a zip / pickle stream) are refused unless the caller
passes ``allow_pickle=True``; they are then read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import AdapterFormatError, UnsafeFileError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE_WEIGHTS = "adapter_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
STATE_DICT_LABEL = "<state dict>"


@dataclass
class RawAdapter:
    """A file's contents before interpretation (all of it untrusted).

    ``tensors``: key -> CPU tensor. ``metadata``: safetensors header metadata (str -> str).
    ``peft_config``: the parsed ``adapter_config.json`` of a PEFT directory, else None.
    ``label``: the path (or ``<state dict>``) used in error messages.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    peft_config: dict[str, Any] | None
    label: str


def read_raw(source: str | os.PathLike | dict, allow_pickle: bool = False) -> RawAdapter:
    """Read a PEFT directory, a single weights file, or an in-memory state dict."""
    if isinstance(source, dict):
        return RawAdapter(_checked_state_dict(source, STATE_DICT_LABEL), {}, None, STATE_DICT_LABEL)
    path = Path(source)
    if path.is_dir():
        return _read_peft_dir(path, allow_pickle)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(path))
    if not path.is_file():
        raise AdapterFormatError(f"{path}: not a regular file or directory")
    config_path = path.parent / PEFT_CONFIG
    config = read_json(config_path) if path.name in (PEFT_WEIGHTS, PEFT_PICKLE_WEIGHTS) \
        and config_path.is_file() else None
    tensors, metadata = _read_weights(path, allow_pickle)
    return RawAdapter(tensors, metadata, config, str(path))


def _read_peft_dir(path: Path, allow_pickle: bool) -> RawAdapter:
    config_path = path / PEFT_CONFIG
    if not config_path.is_file():
        inside = sorted(p.parent.name for p in path.glob(f"*/{PEFT_CONFIG}"))
        hint = f" (it holds PEFT adapters in {', '.join(d + '/' for d in inside)}: load one of them)" if inside else ""
        raise AdapterFormatError(f"{path}: a directory must be a PEFT adapter with {PEFT_CONFIG}{hint}")
    for name in (PEFT_WEIGHTS, PEFT_PICKLE_WEIGHTS):
        if (path / name).is_file():
            tensors, metadata = _read_weights(path / name, allow_pickle)
            return RawAdapter(tensors, metadata, read_json(config_path), str(path / name))
    raise AdapterFormatError(f"{path}: no {PEFT_WEIGHTS} (or {PEFT_PICKLE_WEIGHTS}) in the directory")


def read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _looks_pickled(path: Path) -> bool:
    """Not a safetensors file (8-byte header length, then ``{``), and named or shaped like a
    torch zip / raw pickle."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return path.suffix.lower() in PICKLE_SUFFIXES or head.startswith((b"PK\x03\x04", b"\x80"))


def _read_weights(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if _looks_pickled(path):
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: pickle-based weights can run code when loaded; convert the file to "
                "safetensors, or pass allow_pickle=True (--allow-pickle) if you trust it")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or unsafe pickles
            raise AdapterFormatError(f"{path}: not a readable weights-only torch file ({e})") from e
        if not isinstance(loaded, dict):
            raise AdapterFormatError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
        return _checked_state_dict(loaded, str(path)), {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterFormatError(f"{path}: not a valid safetensors file, or truncated ({e})") from e
    return tensors, metadata


def _checked_state_dict(state_dict: dict, label: str) -> dict[str, torch.Tensor]:
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterFormatError(
                f"{label}: {key!r}: expected str keys and tensor values, got {type(value).__name__}")
    return {key: value.detach().cpu() for key, value in state_dict.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` with header ``metadata``; a temporary file then a rename, so a failed
    write never leaves a half-written file at ``path``. Tensors sharing memory (one layer's
    factors reused by another) are copied, as safetensors stores each separately."""
    contents, storages = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        contents[key] = tensor.clone() if pointer in storages else tensor
        storages.add(pointer)
    _atomic_write(path, lambda tmp: save_file(contents, tmp, metadata=metadata))


def write_json(obj: dict[str, Any], path: Path) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def make_dirs(path: Path, output: Path | None = None) -> None:
    """Create directory ``path`` and its missing parents, for ``output`` (default ``path``).
    A regular file in the way raises ``NotADirectoryError`` naming ``output`` and that file
    (``mkdir`` would say ``File exists``)."""
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{ancestor} is a file, not a directory",
                                         str(output or path))
            break
    path.mkdir(parents=True, exist_ok=True)


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a hidden file beside ``path``, then rename it to ``path``. A failure
    is an ``OSError`` naming ``path`` (not the temporary file; safetensors' own errors, which
    are not OSErrors, too)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, SafetensorError):
            raise _write_error(str(e), path) from e
        if isinstance(e, OSError) and e.filename == str(tmp):
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


def _write_error(message: str, path: Path) -> OSError:
    """An ``OSError`` naming ``path`` from a safetensors write error, whose message ends
    ``... (os error 13) at path "<its own temporary file>"``."""
    code = re.search(r"\(os error (\d+)\)", message)
    if code is not None:
        number = int(code.group(1))
        return OSError(number, os.strerror(number), str(path))
    reason = re.sub(r' at path "[^"]*"', "", message)
    return OSError(errno.EIO, f"cannot write it ({reason})", str(path))
