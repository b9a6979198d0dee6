"""The vLLM versions fastlora's plugin was tested with. Every integration point is a private
vLLM API (``fastlora.vllm.hooks``, ``fastlora.vllm.layers``), so outside this range the plugin
warns once and leaves vLLM untouched; ``tests/test_vllm_ops.py`` checks the points per
version."""
from __future__ import annotations

import re

# [FIRST, BELOW): the release series tested (pre-releases and local builds of them included)
FIRST = (0, 32, 0)
BELOW = (0, 33, 0)
TESTED = "0.32.x"


def parse(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as ``0.32.0``, ``0.32.1.dev3+gabc`` or
    ``0.32.0+cpu``; ValueError for a string that does not start with ``major.minor``."""
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read a vLLM version from {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def unsupported(version: str) -> str | None:
    """Why fastlora leaves vLLM ``version`` untouched (None: it is in the tested range)."""
    try:
        parsed = parse(version)
    except ValueError as e:
        return str(e)
    if not FIRST <= parsed < BELOW:
        return f"vLLM {version} is outside the versions fastlora was tested with ({TESTED})"
    return None
