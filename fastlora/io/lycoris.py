"""LyCORIS LoHa and LoKr layers: read from kohya-style files; per layer, the full weight change
(``delta()``, at most :data:`MAX_ELEMENTS` elements) and the factored forms from which
:func:`fastlora.io.resize` turns them into LoRA by SVD without building it.

Key conventions per module ``<m>`` (kohya names); ``r`` is the file's dim, the scale
``alpha / r`` (``<m>.alpha`` absent or 0: ``alpha = r``, as LyCORIS reads it). ``K'`` is K for a linear layer and the
kernel flattened, ``C*kh*kw``, for a convolution (the base model restores the kernel shape).

LoHa, a Hadamard product of two low-rank products:

* ``hada_w1_a [N, r]``, ``hada_w1_b [r, K']``, ``hada_w2_a [N, r2]``, ``hada_w2_b [r2, K']``:
  ``delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b)``, r from ``hada_w1_b``;
* with Tucker cores ``hada_t1 [r, r, *kernel]`` / ``hada_t2``: ``hada_w1_a [r, N]``,
  ``hada_w1_b [r, C]`` and ``w1 = einsum("ij...,jc,ip->pc...", t1, w1_b, w1_a)`` (same for w2).

LoKr, a Kronecker product:

* ``lokr_w1 [a, c]``, or ``lokr_w1_a [a, r] @ lokr_w1_b [r, c]``;
* ``lokr_w2 [b, d, *kernel]``; or ``lokr_w2_a [b, r] @ lokr_w2_b [r, d']``; or, with a Tucker
  core ``lokr_t2 [r, r, *kernel]``, ``einsum("ij...,ip,jq->pq...", t2, w2_a [r, b], w2_b [r, d])``;
* ``delta = scale * kron(w1, w2)``, ``[a*b, c*d', *kernel]``; r is ``lokr_w1_b``'s rows, else
  ``lokr_w2_b``'s. With both factors full matrices LyCORIS applies no scale (alpha is ignored).

``<m>.dora_scale`` (DoRA magnitude ``[N, 1, ...]``) is kept as for kohya LoRA.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import AdapterShapeError, AdapterSizeError
from .summary import dtype_name

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
MAX_ELEMENTS = 2 ** 28
"""The most elements one tensor built from a LyCORIS layer may have (1 GiB in float32): its
full change, or the factors of its conversion into LoRA."""


def check_size(elements: int, what: str) -> None:
    """Raise :class:`AdapterSizeError` naming ``what`` and its size when ``elements`` is over
    :data:`MAX_ELEMENTS`."""
    if elements > MAX_ELEMENTS:
        raise AdapterSizeError(
            f"{what} would hold {elements:,} elements ({elements * 4 / 2 ** 30:,.3g} GiB in float32), over the "
            f"limit of {MAX_ELEMENTS:,} (fastlora.io.lycoris.MAX_ELEMENTS)")


@dataclass(repr=False)
class _FullDeltaLayer:
    """Shared parts: ``factors`` (role -> tensor, the file's dtype), ``alpha``, ``shape`` of the
    weight change ``[N, *in_shape]``, optional DoRA ``magnitude [N]``."""

    factors: dict[str, torch.Tensor]
    alpha: float
    shape: tuple[int, ...]
    magnitude: torch.Tensor | None = None

    kind = ""
    rslora = False
    bias = None

    @property
    def rank(self) -> int | None:
        raise NotImplementedError

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def is_conv(self) -> bool:
        return len(self.shape) > 2

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.factors.values())).dtype

    @property
    def A(self):
        raise AttributeError(f"a {self.kind} layer has no LoRA factors A and B: turn it into LoRA first "
                             "(fastlora.io.resize, or `fastlora convert --rank R`)")

    B = A

    def with_in_shape(self, in_shape: tuple[int, ...]):
        """The same layer changing a ``[N, *in_shape]`` weight (a flattened kernel restored)."""
        return dataclasses.replace(self, shape=(self.shape[0], *in_shape))

    def delta(self) -> torch.Tensor:
        """The weight change, float32, ``[N, *in_shape]``; :class:`AdapterSizeError` when it
        has more than :data:`MAX_ELEMENTS` elements."""
        check_size(math.prod(self.shape), f"the {self.kind} layer's full weight change "
                   f"[{', '.join(map(str, self.shape))}]")
        return (self._product() * self.scale).reshape(self.shape)

    def _product(self) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return [*self.factors.values(), *([] if self.magnitude is None else [self.magnitude])]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def __repr__(self) -> str:
        rank = "full" if self.rank is None else self.rank
        return (f"{type(self).__name__}(rank={rank}, alpha={self.alpha:g}, scale={self.scale:.6g}, "
                f"shape=[{', '.join(map(str, self.shape))}], {dtype_name(self.dtype)}"
                f"{', DoRA' if self.magnitude is not None else ''})")


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def _tucker_right(t: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """``M [r, C*k]``, ``M[i, (c, k)] = sum_j t[i, j, k] w_b[j, c]``: a Tucker product
    ``einsum("ij...,jc,ip->pc...", t, w_b, w_a)`` is ``w_a^T @ M`` (flattened)."""
    return torch.einsum("ij...,jc->ic...", t, w_b).flatten(1)


class LohaLayer(_FullDeltaLayer):
    kind = "loha"

    @property
    def rank(self) -> int:
        return self.factors["hada_w1_b"].shape[0]

    def halves(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The two Hadamard factors as low-rank products, float32: ``(left [N, r_i],
        right [r_i, K'])`` with ``w_i = left @ right`` (a Tucker half as ``w_a^T @ M``)."""
        f = {k: _f(v) for k, v in self.factors.items()}
        if "hada_t1" in f:
            return [(f[f"hada_w{i}_a"].T, _tucker_right(f[f"hada_t{i}"], f[f"hada_w{i}_b"])) for i in (1, 2)]
        return [(f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]) for i in (1, 2)]

    @property
    def factored_rank(self) -> int:
        """``r1 * r2``, the inner size of :meth:`low_rank_factors`."""
        return self.factors["hada_w1_b"].shape[0] * self.factors["hada_w2_b"].shape[0]

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B [N, r1*r2], A [r1*r2, K'])``, float32, with ``B @ A`` the unscaled change:
        ``(l1 r1) * (l2 r2) = (l1 . l2)(r1 . r2)``, the row-wise (face-splitting) product of
        the left factors times the column-wise (Khatri-Rao) product of the right ones."""
        (l1, r1), (l2, r2) = self.halves()
        left = (l1[:, :, None] * l2[:, None, :]).flatten(1)
        right = (r1[:, None, :] * r2[None, :, :]).flatten(0, 1)
        return left, right

    def _product(self) -> torch.Tensor:
        (l1, r1), (l2, r2) = self.halves()
        return (l1 @ r1) * (l2 @ r2)


class LokrLayer(_FullDeltaLayer):
    kind = "lokr"

    @property
    def rank(self) -> int | None:
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if key in self.factors:
                return self.factors[key].shape[0]
        return None

    def kron_factors(self) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """``w1 [a, c]`` and ``w2 [b, d']`` (a kernel flattened: ``d' = d*kh*kw``), float32,
        each as ``(None, full matrix)`` or as a low-rank product ``(left, right)``; the
        unscaled change, flattened to ``[a*b, c*d']``, is ``kron(w1, w2)``."""
        f = {k: _f(v) for k, v in self.factors.items()}
        w1 = (None, f["lokr_w1"]) if "lokr_w1" in f else (f["lokr_w1_a"], f["lokr_w1_b"])
        if "lokr_w2" in f:
            w2 = (None, f["lokr_w2"].flatten(1))
        elif "lokr_t2" in f:
            w2 = (f["lokr_w2_a"].T, _tucker_right(f["lokr_t2"], f["lokr_w2_b"]))
        else:
            w2 = (f["lokr_w2_a"], f["lokr_w2_b"])
        return [w1, w2]

    def _product(self) -> torch.Tensor:
        w1, w2 = (right if left is None else left @ right for left, right in self.kron_factors())
        return torch.kron(w1, w2)


def _need(tensors: dict, keys: dict, roles, where: str, dims=None) -> None:
    missing = [r for r in roles if r not in tensors]
    if missing:
        raise AdapterShapeError(f"{where}: has {sorted(keys.values())} but no {', '.join(missing)}")
    for role in roles:
        if dims is not None and tensors[role].dim() not in dims:
            raise AdapterShapeError(f"{where}: {keys[role]!r} has shape {list(tensors[role].shape)}, "
                                    f"expected {' or '.join(f'{d}-D' for d in dims)}")


def _shapes_error(where: str, keys: dict, tensors: dict, expected: str) -> AdapterShapeError:
    got = ", ".join(f"{keys[r]} {list(t.shape)}" for r, t in tensors.items())
    return AdapterShapeError(f"{where}: shapes do not chain ({got}); expected {expected}")


def build_loha(tensors: dict, keys: dict, alpha: float | None, magnitude, where: str) -> LohaLayer:
    """A checked :class:`LohaLayer`; ``tensors`` / ``keys``: role -> tensor / file key."""
    tucker = "hada_t1" in tensors or "hada_t2" in tensors
    if tucker:
        _need(tensors, keys, ("hada_t1", "hada_t2"), where)
        _need(tensors, keys, LOHA_ROLES[:4], where, dims=(2,))
        t1, t2 = tensors["hada_t1"], tensors["hada_t2"]
        halves = [(tensors[f"hada_t{i}"], tensors[f"hada_w{i}_a"], tensors[f"hada_w{i}_b"]) for i in (1, 2)]
        ok = t1.dim() > 2 and t1.shape[2:] == t2.shape[2:] and all(
            t.shape[:2] == (a.shape[0], b.shape[0]) for t, a, b in halves) \
            and halves[0][1].shape[1] == halves[1][1].shape[1] and halves[0][2].shape[1] == halves[1][2].shape[1]
        if not ok:
            raise _shapes_error(where, keys, tensors, "hada_t [r, r, *kernel], hada_w_a [r, N], hada_w_b [r, C]")
        shape = (halves[0][1].shape[1], halves[0][2].shape[1], *t1.shape[2:])
    else:
        _need(tensors, keys, LOHA_ROLES[:4], where, dims=(2,))
        (a1, b1), (a2, b2) = [(tensors[f"hada_w{i}_a"], tensors[f"hada_w{i}_b"]) for i in (1, 2)]
        if a1.shape[1] != b1.shape[0] or a2.shape[1] != b2.shape[0] or a1.shape[0] != a2.shape[0] \
                or b1.shape[1] != b2.shape[1]:
            raise _shapes_error(where, keys, tensors, "hada_w_a [N, r] and hada_w_b [r, K']")
        shape = (a1.shape[0], b1.shape[1])
    layer = LohaLayer(dict(tensors), 0.0, shape, magnitude)
    layer.alpha = float(layer.rank) if alpha is None else alpha
    return layer


def _lokr_factor(tensors: dict, keys: dict, i: int, where: str) -> tuple[int, ...]:
    """The checked shape of Kronecker factor ``w{i}``: ``lokr_w{i}``, ``lokr_w{i}_a @ lokr_w{i}_b``,
    or (``i == 2``) their Tucker product with ``lokr_t2``."""
    full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
    tucker = i == 2 and "lokr_t2" in tensors
    if (full in tensors) == (a in tensors or b in tensors):
        raise AdapterShapeError(f"{where}: needs {full}, or {a} and {b} (not both), got {sorted(keys.values())}")
    if full in tensors:
        if tucker:
            raise AdapterShapeError(f"{where}: lokr_t2 goes with lokr_w2_a / lokr_w2_b, not with lokr_w2")
        _need(tensors, keys, (full,), where, dims=(2,) if i == 1 else (2, 3, 4, 5))
        return tuple(tensors[full].shape)
    _need(tensors, keys, (a, b), where, dims=(2,))
    ta, tb = tensors[a], tensors[b]
    if tucker:
        t = tensors["lokr_t2"]
        if t.dim() < 3 or t.shape[:2] != (ta.shape[0], tb.shape[0]):
            raise _shapes_error(where, keys, {r: tensors[r] for r in ("lokr_t2", a, b)},
                                f"lokr_t2 [r, r, *kernel], {a} [r, b], {b} [r, d]")
        return ta.shape[1], tb.shape[1], *t.shape[2:]
    if ta.shape[1] != tb.shape[0]:
        raise _shapes_error(where, keys, {r: tensors[r] for r in (a, b)}, f"{a} [rows, r] and {b} [r, columns]")
    return ta.shape[0], tb.shape[1]


def build_lokr(tensors: dict, keys: dict, alpha: float | None, magnitude, where: str) -> LokrLayer:
    """A checked :class:`LokrLayer`; ``tensors`` / ``keys``: role -> tensor / file key."""
    w1_shape, w2_shape = (_lokr_factor(tensors, keys, i, where) for i in (1, 2))
    if "lokr_w1_b" in tensors and "lokr_w2_b" in tensors and \
            tensors["lokr_w1_b"].shape[0] != tensors["lokr_w2_b"].shape[0]:
        raise _shapes_error(where, keys, {r: tensors[r] for r in ("lokr_w1_b", "lokr_w2_b")},
                            "one dim r for both factors (it sets the scale alpha / r)")
    shape = (w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1], *w2_shape[2:])
    layer = LokrLayer(dict(tensors), 0.0, shape, magnitude)
    layer.alpha = float(layer.rank or 1) if alpha is None else alpha
    return layer
