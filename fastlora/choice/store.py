"""Measured implementation choices, kept in memory and on disk.

One JSON file per GPU model and library versions (fastlora, torch, Triton), in
``FASTLORA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``).
Files are written atomically (a temporary file, then a rename) and merged with what other
processes wrote meanwhile, under an exclusive ``fcntl.flock`` on a ``.lock`` file beside the
cache file, so that concurrent writers lose no entries (where ``fcntl`` is missing, as on
Windows, without a lock: a concurrent writer's entries may then be lost, to be measured
again). An unreadable file (not UTF-8, not JSON, nested too deep, wrong types) is ignored
with one warning and rewritten by the next write.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_FORMAT = 1
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError)
"""What parsing an untrusted file may raise (UnicodeDecodeError and JSONDecodeError are
ValueErrors; RecursionError: JSON nested too deep; OverflowError: a number beyond float)."""


@dataclass
class Choice:
    """The implementation chosen for one key, the median times (ms) that chose it, and why
    the other candidates were not timed."""
    impl: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        """A choice as ``to_json`` writes it; raises TypeError / KeyError on anything else."""
        if not isinstance(data, dict):
            raise TypeError(f"a choice must be an object, got {type(data).__name__}")
        impl = data["impl"]
        if not isinstance(impl, str):
            raise TypeError(f"impl must be a string, got {impl!r}")
        timings, unavailable = data.get("timings_ms", {}), data.get("unavailable", {})
        if not isinstance(timings, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in timings.values()):
            raise TypeError(f"timings_ms must map names to finite numbers, got {timings!r}"[:200])
        if not isinstance(unavailable, dict) or not all(isinstance(v, str) for v in unavailable.values()):
            raise TypeError(f"unavailable must map names to strings, got {unavailable!r}"[:200])
        return cls(impl, {k: float(v) for k, v in timings.items()}, dict(unavailable))


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

    from .. import __version__

    return {"fastlora": __version__, "torch": torch.__version__, "triton": triton.__version__}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


class ChoiceCache:
    """Choices by (device name, key): read from the device's file on first use, written
    back after each new choice."""

    def __init__(self):
        self._loaded: dict[str, dict[str, Choice]] = {}
        self._warned: set[Path] = set()  # unreadable files already warned about

    def path(self, device: str) -> Path:
        tags = "--".join(f"{name}-{_slug(v)}" for name, v in _versions().items())
        return cache_dir() / f"{_slug(device)}--{tags}.json"

    def _read(self, path: Path) -> dict[str, Choice]:
        """The choices in ``path``; {} if it is missing or unreadable (one warning per
        file until it is rewritten)."""
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                found = data.get("format") if isinstance(data, dict) else type(data).__name__
                raise ValueError(f"format {found!r}, expected {_FORMAT}")
            choices = data["choices"]
            if not isinstance(choices, dict):
                raise TypeError(f"choices must be an object, got {type(choices).__name__}")
            return {k: Choice.from_json(v) for k, v in choices.items()}
        except FileNotFoundError:
            return {}
        except (OSError, *_UNREADABLE) as exc:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"fastlora: cannot read the choice cache {path} ({exc}); "
                              "ignoring it" if isinstance(exc, OSError) else
                              f"fastlora: ignoring the unreadable choice cache {path} "
                              f"({type(exc).__name__}: {exc}); it will be rewritten", stacklevel=3)
            return {}

    def _choices(self, device: str) -> dict[str, Choice]:
        if device not in self._loaded:
            self._loaded[device] = self._read(self.path(device))
        return self._loaded[device]

    def get(self, device: str, key: str) -> Choice | None:
        return self._choices(device).get(key)

    def put(self, device: str, key: str, choice: Choice) -> None:
        """Remember ``choice`` and write the device's file: under its lock, the file's current
        content merged with this process's choices, then an atomic replace."""
        choices = self._choices(device)
        choices[key] = choice
        path = self.path(device)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                merged = {**self._read(path), **choices}
                payload = {"format": _FORMAT, "device": device, "versions": _versions(),
                           "choices": {k: asdict(v) for k, v in sorted(merged.items())}}
                with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name,
                                                 suffix=".tmp", delete=False) as f:
                    tmp = f.name
                    json.dump(payload, f, indent=1)
                os.replace(tmp, path)
            self._warned.discard(path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            warnings.warn(f"fastlora: cannot write the choice cache {path} ({exc}); the "
                          "choice is kept for this process only", stacklevel=3)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive ``fcntl.flock`` on ``<path>.lock`` (created if missing; never
    removed, so that every writer locks the same file); no lock without ``fcntl``."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
