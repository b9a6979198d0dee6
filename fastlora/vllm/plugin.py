"""The plugin's switch: ``register`` is the ``vllm.general_plugins`` entry point (vLLM calls
it once in every process, before it builds a model).

Active when ``FASTLORA_VLLM=1``, or when ``FASTLORA_VLLM`` is unset and vLLM's own
``VLLM_PLUGINS`` (a comma-separated list) names ``fastlora``; ``FASTLORA_VLLM=0`` turns it
off. Inactive, it imports nothing and changes nothing.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from . import version

ENV = "FASTLORA_VLLM"
NAME = "fastlora"  # the entry point's name, as VLLM_PLUGINS names it
# vLLM's handlers sit on its "vllm" logger: a child of it prints as vLLM's own lines do
logger = logging.getLogger("vllm.fastlora")
_registered = False


def active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the plugin is switched on in ``environ`` (see the module docstring)."""
    value = environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 1 (on) or 0 (off)")
    if value:
        return value == "1"
    selected = environ.get("VLLM_PLUGINS")
    return selected is not None and NAME in (p.strip() for p in selected.split(","))


def register() -> None:
    """Install fastlora's hooks into vLLM when the plugin is active and vLLM's version was
    tested; outside the tested range warn once and change nothing. Safe to call again."""
    global _registered
    if _registered or not active():
        return
    _registered = True
    import vllm

    why = version.unsupported(vllm.__version__)
    if why is not None:
        logger.warning("fastlora: %s; vLLM's own LoRA path runs (the plugin changed nothing)",
                       why)
        return
    from . import hooks

    hooks.install()
