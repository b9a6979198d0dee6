"""``resize``: lower each layer's rank by a truncated SVD, keeping its scale; ``to_lora``: the
same for LyCORIS (LoHa, LoKr) layers, which become LoRA layers.

Every SVD runs in float32 without forming the ``[N, K']`` change (conv ``A`` flattened to
``[r, C*kh*kw]``) where a factored form gives it:

* LoRA, ``B A``: QR-factor both factors (``B = Qb Rb``, ``A^T = Qa Ra``:
  ``B A = Qb (Rb Ra^T) Qa^T``) and decompose the small ``r x r`` core;
* LoHa, ``(a1 b1) * (a2 b2)``: the same on ``(a1 . a2)(b1 . b2)``, the row-wise product of the
  left factors (``[N, r1*r2]``) times the column-wise product of the right ones, when
  ``r1*r2 < min(N, K')``; else the full change (no larger than those factors) is decomposed;
* LoKr, ``kron(w1, w2)``: the SVD of a Kronecker product is the Kronecker product of the
  factors' SVDs, so the singular values are the pairwise products ``s1_i s2_j`` and only the
  kept pairs' vectors ``kron(u1_i, u2_j)``, ``kron(v1_i, v2_j)`` are built.

No tensor larger than :data:`fastlora.io.lycoris.MAX_ELEMENTS` is built (:class:`AdapterSizeError`
names the layer and the size), and a change that overflows float32 raises
:class:`NonFiniteWeightError` naming the layer. The kept singular values are split evenly:
``B' = U_k sqrt(S_k)``, ``A' = sqrt(S_k) V_k^T``.

Rank choice per layer (``method``):

* ``fixed``: ``rank`` (at most the number of singular values: a LoRA layer's rank,
  ``min(N, K', r1*r2)`` for a LoHa, the product of the factors' ranks for a LoKr);
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
from typing import Callable

import torch
from tqdm import tqdm

from .adapter import Adapter, AdapterLayer, alpha_for_scale
from .finite import check_finite
from .lycoris import check_size

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
        layers[name], report[name] = _resize_layer(name, layer, rank, method, threshold, max_rank)
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


@dataclass(frozen=True)
class _Spectrum:
    """A layer's change as ``scale * U diag(s) Vh``: ``s [p]`` float32, descending, and
    ``vectors(k)``, the first k singular vectors ``(U_k [N, k], Vh_k [k, K'])``."""

    s: torch.Tensor
    vectors: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    scale: float


def _finite(t: torch.Tensor, where: str) -> torch.Tensor:
    check_finite(t, f"{where}: its weight change in float32 (the product of its factors)")
    return t


def _low_rank_svd(left: torch.Tensor, right: torch.Tensor, where: str):
    """``U [N, s]``, ``S [s]``, ``Vh [s, K']`` of ``left [N, r] @ right [r, K']`` (float32)
    from the SVD of the ``QR`` cores, never forming the product."""
    q_b, r_b = torch.linalg.qr(_finite(left, where))
    q_a, r_a = torch.linalg.qr(_finite(right, where).T)
    u, s, vh = torch.linalg.svd(_finite(r_b @ r_a.T, where))
    return q_b @ u, s, vh @ q_a.T


def _factor_svd(left: torch.Tensor | None, right: torch.Tensor, where: str):
    """The thin SVD of ``right`` (``left`` None: a full matrix) or of ``left @ right``."""
    if left is None:
        return torch.linalg.svd(_finite(right, where), full_matrices=False)
    return _low_rank_svd(left, right, where)


def _ready(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float) -> _Spectrum:
    return _Spectrum(s, lambda k: (u[:, :k], vh[:k]), scale)


def _spectrum(name: str, layer) -> _Spectrum:
    """A LoRA layer's ``B @ A`` with its scale; a LyCORIS layer's change with its scale folded
    in (scale 1)."""
    where = f"layer {name!r}"
    if layer.kind == "lora":
        return _ready(*_low_rank_svd(layer.B.float(), layer.A.float().flatten(1), where), layer.scale)
    n, k = layer.out_features, math.prod(layer.in_shape)
    if layer.kind == "lokr":
        return _kron_spectrum(layer, n, k, where)
    inner = layer.factored_rank
    if inner < min(n, k):
        check_size((n + k) * inner, f"{where}: the LoHa factors [{n}, {inner}] and [{inner}, {k}]")
        left, right = layer.low_rank_factors()
        return _ready(*_low_rank_svd(left * layer.scale, right, where), 1.0)
    check_size(n * k, f"{where}: the full LoHa change [{n}, {k}]")
    return _ready(*_factor_svd(None, layer.delta().flatten(1), where), 1.0)


def _kron_spectrum(layer, n: int, k: int, where: str) -> _Spectrum:
    """``kron(w1, w2)``'s spectrum from the factors' SVDs: singular values ``s1_i s2_j``
    sorted, the vectors of pair ``(i, j)`` ``kron(u1_i, u2_j)`` and ``kron(vh1_i, vh2_j)``."""
    (l1, r1), (l2, r2) = layer.kron_factors()
    u1, s1, vh1 = _factor_svd(l1, r1 * layer.scale, where)
    u2, s2, vh2 = _factor_svd(l2, r2, where)
    check_size(len(s1) * len(s2), f"{where}: the {len(s1)} x {len(s2)} singular values of its LoKr change")
    s, order = (s1[:, None] * s2[None, :]).flatten().sort(descending=True)
    _finite(s, where)

    def vectors(keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = order[:keep] // len(s2), order[:keep] % len(s2)
        u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(n, keep)
        vh = (vh1[i][:, :, None] * vh2[j][:, None, :]).reshape(keep, k)
        return u, vh

    return _Spectrum(s, vectors, 1.0)


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


def _resize_layer(name: str, layer, rank, method, threshold, max_rank) -> tuple[AdapterLayer, LayerResize]:
    spectrum = _spectrum(name, layer)
    s = spectrum.s
    keep = _choose_rank(s, rank, method, threshold, max_rank)
    n, k = layer.out_features, math.prod(layer.in_shape)
    check_size((n + k) * keep, f"layer {name!r}: rank-{keep} LoRA factors [{n}, {keep}] and [{keep}, {k}]")
    u, vh = spectrum.vectors(keep)
    root = s[:keep].sqrt()
    b_dtype, a_dtype = (layer.B.dtype, layer.A.dtype) if layer.kind == "lora" else (layer.dtype, layer.dtype)
    new_b = (u * root).to(b_dtype)
    new_a = (root[:, None] * vh).reshape(keep, *layer.in_shape).to(a_dtype)
    s = s.double()  # its squares may overflow float32
    total_sq, total = float(s.square().sum()), float(s.sum())
    report = LayerResize(
        old_rank=layer.rank, new_rank=keep,
        fro_retained=100.0 * math.sqrt(float(s[:keep].square().sum()) / total_sq) if total_sq else 100.0,
        sv_retained=100.0 * float(s[:keep].sum()) / total if total else 100.0, kind=layer.kind)
    return AdapterLayer(new_a, new_b, alpha_for_scale(spectrum.scale, keep, layer.rslora), layer.rslora,
                        layer.magnitude, layer.bias), report
