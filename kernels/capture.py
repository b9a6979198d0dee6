"""No autotuning inside a CUDA-graph capture.

Triton's autotuner times every config on the first launch of a key (``do_bench``: host
synchronizations and a cache-flush allocation), which a capture forbids: a kernel first
launched inside a capture (a shape never run before, or an implementation whose choice was
read from the disk cache in a fresh process) would break the capture with an unrelated
CUDA error. ``guard(tuner)`` makes such a launch raise ``RuntimeError`` naming the kernel
and its autotune key (the shape) before anything is timed; a key tuned earlier (by
``fastlora.warmup`` / ``fastlora.warmup_multi``, or the same call run once outside the
capture) launches its config as always.
"""
from __future__ import annotations

import torch


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def guard(tuner):
    """``tuner`` (a Triton ``Autotuner``), its config timing refused under capture."""
    bench = tuner._bench

    def guarded(*args, config, **meta):
        if capturing():
            values = {**dict(zip(tuner.arg_names, args)), **meta}
            key = ", ".join(f"{name}={values[name]}" for name in tuner.keys if name in values)
            raise RuntimeError(
                f"fastlora: kernel {tuner.fn.__name__} has no tuned config for [{key}] and a "
                "CUDA graph is being captured, where autotuning cannot run. Before capturing, "
                "call fastlora.warmup(...) (lora_linear / dora_linear) or "
                "fastlora.warmup_multi(...) (multi_lora_linear) with these shapes, or run the "
                "step once outside the capture.")
        return bench(*args, config=config, **meta)

    tuner._bench = guarded
    return tuner
