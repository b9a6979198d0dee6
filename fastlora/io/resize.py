"""``resize``: lower each layer's rank by a truncated SVD, keeping its scale; ``to_lora``: the
same for LyCORIS (LoHa, LoKr) layers, which become LoRA layers.

A LoRA layer's SVD runs in float32 on the small ``r x r`` core left by QR-factoring both
factors (``B = Qb Rb``, ``A^T = Qa Ra``: ``B A = Qb (Rb Ra^T) Qa^T``), which gives the singular
values of ``B @ A`` (conv ``A`` flattened to ``[r, C*kh*kw]``) without forming the ``[N, K]``
product. A LyCORIS layer has no such factors: its full change ``[N, K']`` is built and
decomposed. The kept singular values are split evenly: ``B' = U_k sqrt(S_k)``,
``A' = sqrt(S_k) V_k^T``.

Rank choice per layer (``method``):

* ``fixed``: ``rank`` (at most the current rank, or ``min(N, K')`` for a LyCORIS layer);
* ``sv_ratio``: the singular values at least ``S_max / threshold`` (``threshold >= 1``);
* ``sv_cumulative``: the fewest whose sum reaches ``threshold`` (0..1] of the total;
* ``sv_fro``: the fewest whose Frobenius norm reaches ``threshold`` (0..1] of the total.

``max_rank`` caps every layer; no layer drops below rank 1. The report gives, per layer, the
share of the change's Frobenius norm and of its singular-value sum that the kept rank retains.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .adapter import Adapter, AdapterLayer, alpha_for_scale

METHODS = ("fixed", "sv_ratio", "sv_cumulative", "sv_fro")


@dataclass(frozen=True)
class LayerResize:
    """One layer's outcome: its kind and rank before (None: a LoKr of full matrices), the rank
    after, and the percentage of the change's Frobenius norm and of the sum of its singular
    values that the kept rank retains."""

    old_rank: int | None
    new_rank: int
    fro_retained: float
    sv_retained: float
    kind: str = "lora"


def resize(adapter: Adapter, rank: int | None = None, method: str = "fixed", threshold: float | None = None,
           max_rank: int | None = None, *, progress: bool = False) -> tuple[Adapter, dict[str, LayerResize]]:
    """A copy of ``adapter`` with every layer reduced (LyCORIS layers turned into LoRA), and a
    per-layer report keyed like ``adapter.layers``.

    Each layer keeps its scale (new alpha = scale * new rank, or scale * sqrt(new rank) with
    rsLoRA; a former LyCORIS layer gets scale 1), DoRA magnitude, bias and dtypes.
    ``progress`` shows a progress bar on a terminal (stderr).
    """
    return _reduce(adapter, lambda layer: True, rank, method, threshold, max_rank, progress, "resize")


def to_lora(adapter: Adapter, rank: int | None = None, method: str = "fixed", threshold: float | None = None,
            max_rank: int | None = None, *, progress: bool = False) -> tuple[Adapter, dict[str, LayerResize]]:
    """``resize`` applied to the LyCORIS (LoHa, LoKr) layers only: a LoRA adapter; LoRA layers
    are kept as they are. The report covers the converted layers."""
    return _reduce(adapter, lambda layer: layer.kind != "lora", rank, method, threshold, max_rank, progress,
                   "convert")


def _reduce(adapter, selected, rank, method, threshold, max_rank, progress, desc):
    _check_arguments(rank, method, threshold, max_rank)
    layers, report = dict(adapter.layers), {}
    chosen = [(name, layer) for name, layer in adapter.layers.items() if selected(layer)]
    for name, layer in tqdm(chosen, desc=desc, unit="layer", disable=None if progress else True):
        layers[name], report[name] = _resize_layer(layer, rank, method, threshold, max_rank)
    source_format = "kohya" if adapter.source_format == "lycoris" and all(
        layer.kind == "lora" for layer in layers.values()) else adapter.source_format
    return dataclasses.replace(adapter, layers=layers, source_format=source_format), report


def _check_arguments(rank, method, threshold, max_rank) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fixed":
        if rank is None or rank < 1:
            raise ValueError(f"method 'fixed' needs rank >= 1, got {rank!r}")
        if threshold is not None:
            raise ValueError("threshold applies to the sv_* methods, not to 'fixed'")
    elif rank is not None:
        raise ValueError(f"rank applies to method 'fixed'; use max_rank to cap method {method!r}")
    elif threshold is None:
        raise ValueError(f"method {method!r} needs a threshold")
    elif method == "sv_ratio" and not threshold >= 1:
        raise ValueError(f"sv_ratio needs threshold >= 1 (largest / smallest kept value), got {threshold}")
    elif method != "sv_ratio" and not 0 < threshold <= 1:
        raise ValueError(f"{method} needs 0 < threshold <= 1, got {threshold}")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")


def _svd(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``U [N, s]``, ``S [s]`` (descending), ``Vh [s, K']`` in float32, and the scale they are
    to be used with: of ``B @ A`` and the layer's scale for LoRA, of the scaled change and 1 else."""
    if layer.kind != "lora":
        u, s, vh = torch.linalg.svd(layer.delta().flatten(1), full_matrices=False)
        return u, s, vh, 1.0
    q_b, r_b = torch.linalg.qr(layer.B.float())
    q_a, r_a = torch.linalg.qr(layer.A.float().flatten(1).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T, layer.scale


def _choose_rank(s: torch.Tensor, rank, method: str, threshold, max_rank) -> int:
    total = float(s.sum())
    if method == "fixed":
        keep = rank
    elif total == 0.0:
        keep = 1
    elif method == "sv_ratio":
        keep = int((s >= s[0] / threshold).sum())
    else:
        values = s if method == "sv_cumulative" else s.square()
        fraction = threshold if method == "sv_cumulative" else threshold ** 2
        cumulative = values.double().cumsum(0) / values.double().sum()
        keep = int((cumulative < fraction).sum()) + 1
    return max(1, min(keep, len(s), max_rank or keep))


def _resize_layer(layer, rank, method, threshold, max_rank) -> tuple[AdapterLayer, LayerResize]:
    u, s, vh, scale = _svd(layer)
    keep = _choose_rank(s, rank, method, threshold, max_rank)
    root = s[:keep].sqrt()
    b_dtype, a_dtype = (layer.B.dtype, layer.A.dtype) if layer.kind == "lora" else (layer.dtype, layer.dtype)
    new_b = (u[:, :keep] * root).to(b_dtype)
    new_a = (root[:, None] * vh[:keep]).reshape(keep, *layer.in_shape).to(a_dtype)
    total_sq, total = float(s.square().sum()), float(s.sum())
    report = LayerResize(
        old_rank=layer.rank, new_rank=keep,
        fro_retained=100.0 * math.sqrt(float(s[:keep].square().sum()) / total_sq) if total_sq else 100.0,
        sv_retained=100.0 * float(s[:keep].sum()) / total if total else 100.0, kind=layer.kind)
    return AdapterLayer(new_a, new_b, alpha_for_scale(scale, keep, layer.rslora), layer.rslora,
                        layer.magnitude, layer.bias), report
