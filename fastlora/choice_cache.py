"""Measured implementation choices, kept in memory and on disk.

One JSON file per GPU model and library versions (fastlora, torch, Triton), in
``FASTLORA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``).
Files are written atomically (a temporary file, then a rename) and merged with what other
processes wrote meanwhile; an unreadable file is ignored with a warning and rewritten.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

_FORMAT = 1


@dataclass
class Choice:
    """The implementation chosen for one key, the median times (ms) that chose it, and why
    the other candidates were not timed."""
    impl: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        impl = data["impl"]
        timings = {str(k): float(v) for k, v in data.get("timings_ms", {}).items()}
        unavailable = {str(k): str(v) for k, v in data.get("unavailable", {}).items()}
        if not isinstance(impl, str):
            raise TypeError(f"impl must be a string, got {impl!r}")
        return cls(impl, timings, unavailable)


def cache_dir() -> Path:
    """Where the choice files live (``FASTLORA_CACHE_DIR`` overrides)."""
    forced = os.environ.get("FASTLORA_CACHE_DIR")
    if forced:
        return Path(forced).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastlora"


def _versions() -> dict[str, str]:
    import torch
    import triton

    from . import __version__

    return {"fastlora": __version__, "torch": torch.__version__, "triton": triton.__version__}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


class ChoiceCache:
    """Choices by (device name, key): read from the device's file on first use, written
    back after each new choice."""

    def __init__(self):
        self._loaded: dict[str, dict[str, Choice]] = {}

    def path(self, device: str) -> Path:
        tags = "--".join(f"{name}-{_slug(v)}" for name, v in _versions().items())
        return cache_dir() / f"{_slug(device)}--{tags}.json"

    def _read(self, path: Path) -> dict[str, Choice]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            warnings.warn(f"fastlora: cannot read the choice cache {path} ({exc}); ignoring it",
                          stacklevel=3)
            return {}
        try:
            data = json.loads(text)
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
            return {str(k): Choice.from_json(v) for k, v in data["choices"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            warnings.warn(f"fastlora: ignoring the unreadable choice cache {path} "
                          f"({type(exc).__name__}: {exc}); it will be rewritten", stacklevel=3)
            return {}

    def _choices(self, device: str) -> dict[str, Choice]:
        if device not in self._loaded:
            self._loaded[device] = self._read(self.path(device))
        return self._loaded[device]

    def get(self, device: str, key: str) -> Choice | None:
        return self._choices(device).get(key)

    def put(self, device: str, key: str, choice: Choice) -> None:
        """Remember ``choice`` and write the device's file (merged with its current content)."""
        choices = self._choices(device)
        choices[key] = choice
        path = self.path(device)
        merged = {**self._read(path), **choices}
        payload = {"format": _FORMAT, "device": device, "versions": _versions(),
                   "choices": {k: asdict(v) for k, v in sorted(merged.items())}}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name,
                                             suffix=".tmp", delete=False) as f:
                tmp = f.name
                json.dump(payload, f, indent=1)
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            warnings.warn(f"fastlora: cannot write the choice cache {path} ({exc}); the "
                          "choice is kept for this process only", stacklevel=3)

    def forget(self) -> None:
        """Drop what is in memory (the files stay): the next lookup reads them again."""
        self._loaded.clear()
