"""Multi-adapter (gathered) batches: every row of x uses its own adapter, in one pass over W.

``multi_lora_linear(x, weight, bias, bank, adapter_index)``: row i of x (leading dims
flattened) gets ``y_i = x_i W^T + bias + s_a x_i A_a^T B_a^T`` for its adapter
``a = adapter_index[i]`` (DoRA adapters: ``g_a * (x_i W^T + s_a x_i A_a^T B_a^T) + bias``,
``g_a = m_a / ||W + s_a B_a A_a||`` with the norm detached); ``-1`` means the base layer
only. The bank is a :class:`PackedAdapters` (or anything with a ``packed()`` method giving
one, such as ``fastlora.bank.AdapterBank``).

Layout: adapters are packed along the rank, not padded to the largest one: adapter i owns
rows ``offsets[i] .. offsets[i] + ranks[i]`` of ``A [S, K]`` (its ``lora_A``) and of
``B [S, N]`` (its ``lora_B`` transposed), so memory and kernel work follow the real ranks.

The Triton path (see ``fastlora.kernels.multi_meta``): rows grouped by adapter on the
device (stable argsort + searchsorted: no host sync, static grids, CUDA-graph safe), a
shrink over segment tiles, the base GEMM over all rows with each tile's adapters added
in its prologue, and a backward giving dx and every adapter's own dA, dB (and DoRA
magnitude) gradient. Index range: on CPU (and the reference backend) an index outside
``-1 .. n - 1`` raises ``ValueError``; on CUDA it is checked without a host sync by a
device-side assert (``torch._assert_async``: the error surfaces at the next
synchronization and, as for an out-of-range ``nn.Embedding`` index, leaves the CUDA context
unusable) and the kernels clamp indices so that they never read out of bounds meanwhile.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from . import backend, reference
from .functional import _autocast, _check_devices, _check_float, _seed, dora_weight_norm

__all__ = ["PackedAdapters", "multi_lora_linear", "pack_adapters"]


@dataclass(frozen=True, eq=False)
class PackedAdapters:
    """n adapters of one base layer (weight ``[N, K]``), packed along the rank.

    A ``[S, K]``, B ``[S, N]`` (lora_B transposed), same float dtype; offsets, ranks
    ``[n]`` int32 (rank 0: the adapter adds nothing to this layer); scales ``[n]`` fp32;
    ``max_rank`` >= every rank (static: it sizes a ``[M, max_rank]`` fp32 buffer). DoRA:
    magnitude ``[n, N]``, weight_norm ``[n, N]`` fp32 (the detached ``||W + s B A||``; 1 in
    rows of plain adapters) and is_dora ``[n]`` bool, all three or none. dropout: per-adapter
    probabilities (host floats) applied in training, or None.
    """
    A: torch.Tensor
    B: torch.Tensor
    offsets: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    max_rank: int
    magnitude: torch.Tensor | None = None
    weight_norm: torch.Tensor | None = None
    is_dora: torch.Tensor | None = None
    dropout: tuple[float, ...] | None = None

    def __post_init__(self):
        n = self.offsets.shape[0] if self.offsets.dim() == 1 else -1
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[0]:
            raise ValueError(f"bank: A must be [S, K] and B [S, N] (lora_B transposed) with the "
                             f"same S, got {tuple(self.A.shape)} and {tuple(self.B.shape)}")
        for name in ("offsets", "ranks"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or tuple(t.shape) != (n,):
                raise ValueError(f"bank: {name} must be int32 [n], got {t.dtype} {tuple(t.shape)}")
        if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (n,):
            raise ValueError(f"bank: scales must be float32 [{n}], got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")
        dora = (self.magnitude, self.weight_norm, self.is_dora)
        if any(t is None for t in dora) != all(t is None for t in dora):
            raise ValueError("bank: magnitude, weight_norm and is_dora go together (DoRA)")
        if self.magnitude is not None:
            rows = (n, self.B.shape[1])
            if tuple(self.magnitude.shape) != rows or tuple(self.weight_norm.shape) != rows:
                raise ValueError(f"bank: magnitude and weight_norm must be {list(rows)}, got "
                                 f"{list(self.magnitude.shape)} and {list(self.weight_norm.shape)}")
            if self.is_dora.dtype != torch.bool or tuple(self.is_dora.shape) != (n,):
                raise ValueError(f"bank: is_dora must be bool [{n}]")
        if self.dropout is not None and (len(self.dropout) != n
                                         or not all(0.0 <= p < 1.0 for p in self.dropout)):
            raise ValueError(f"bank: dropout must hold {n} probabilities in [0, 1)")
        if self.offsets.device.type == "cpu" and n > 0 and not torch.compiler.is_compiling():
            off, rk = self.offsets.long(), self.ranks.long()
            if (rk < 0).any() or (rk > self.max_rank).any():
                raise ValueError(f"bank: ranks {self.ranks.tolist()} outside 0..max_rank={self.max_rank}")
            if (off < 0).any() or (off + rk > self.A.shape[0]).any():
                raise ValueError(f"bank: adapter rows (offsets + ranks) exceed A's {self.A.shape[0]} rows")

    @property
    def n(self) -> int:
        return self.offsets.shape[0]

    def packed(self) -> PackedAdapters:
        return self

    def map(self, fn) -> PackedAdapters:
        """The same bank with ``fn`` applied to A, B and magnitude (e.g. a dtype change)."""
        return replace(self, A=fn(self.A), B=fn(self.B),
                       magnitude=fn(self.magnitude) if self.magnitude is not None else None)


def pack_adapters(adapters: Sequence[tuple], *, weight: torch.Tensor | None = None,
                  weight_norms: Sequence[torch.Tensor | None] | None = None,
                  dropout: Sequence[float] | None = None, max_rank: int | None = None
                  ) -> PackedAdapters:
    """Pack ``(lora_A [r, K], lora_B [N, r], scale, magnitude [N] or None)`` per adapter.

    Differentiable (``torch.cat``): gradients reach the given tensors. DoRA norms come
    from ``weight_norms[i]`` or are computed from ``weight`` ``[N, K]``. ``dropout``: per-adapter
    probabilities for training; ``max_rank``: default the largest rank.
    """
    if not adapters:
        raise ValueError("pack_adapters needs at least one adapter")
    ranks = [a[0].shape[0] for a in adapters]
    offsets = [sum(ranks[:i]) for i in range(len(ranks))]
    device = adapters[0][0].device
    dora = [len(a) > 3 and a[3] is not None for a in adapters]
    magnitude = norm = is_dora = None
    if any(dora):
        n_out = adapters[0][1].shape[0]
        ones = torch.ones(n_out, dtype=torch.float32, device=device)
        norms = []
        for i, (lora_A, lora_B, scale, *_) in enumerate(adapters):
            if not dora[i]:
                norms.append(ones)
            elif weight_norms is not None and weight_norms[i] is not None:
                norms.append(weight_norms[i].detach().float())
            elif weight is None:
                raise ValueError("pack_adapters: DoRA adapters need weight or weight_norms")
            else:
                norms.append(dora_weight_norm(weight, lora_A, lora_B, scale))
        mag_dtype = next(a[3].dtype for a, d in zip(adapters, dora) if d)
        magnitude = torch.stack([a[3] if d else ones.to(mag_dtype) for a, d in zip(adapters, dora)])
        norm = torch.stack(norms)
        is_dora = torch.tensor(dora, device=device)
    return PackedAdapters(
        A=torch.cat([a[0] for a in adapters]), B=torch.cat([a[1].t() for a in adapters]),
        offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        scales=torch.tensor([float(a[2]) for a in adapters], dtype=torch.float32, device=device),
        max_rank=max(ranks) if max_rank is None else max_rank,
        magnitude=magnitude, weight_norm=norm, is_dora=is_dora,
        dropout=tuple(float(p) for p in dropout) if dropout is not None else None)


# ---------------------------------------------------------------- custom ops
# (the kernels are imported on first use, as fastlora.functional does: importing fastlora
# loads neither Triton nor the kernels)


def _groups(perm, keys, seg, n):
    from .kernels.multi_meta import RowGroups

    return RowGroups(perm, keys, seg, n)


@torch.library.custom_op("fastlora::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                   scales: torch.Tensor, g: torch.Tensor | None, dora_flags: torch.Tensor | None,
                   dropout: torch.Tensor | None, perm: torch.Tensor, keys: torch.Tensor,
                   seg: torch.Tensor, max_rank: int, seed: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``; returns y ``[M, N]`` (x's dtype) and S ``[M, max_rank]`` fp32 (sorted
    rows: the scaled shrink). g ``[n, N]`` fp32 (DoRA), dropout ``[n]`` fp32 or None."""
    from .kernels.multi_linear import MultiLowRank, multi_fused_linear
    from .kernels.multi_shrink import multi_lora_shrink

    groups = _groups(perm, keys, seg, offsets.shape[0])
    s = multi_lora_shrink(x, A, offsets, ranks, scales, max_rank, groups, dropout, int(seed))
    y = multi_fused_linear(x, weight.t(), MultiLowRank(s, B, offsets, ranks, groups), bias,
                           g_out=g)
    return y, s


@multi_lora_fwd.register_fake
def _(x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg,
      max_rank, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], max(max_rank, 1)), dtype=torch.float32))


@torch.library.custom_op("fastlora::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                   offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                   g: torch.Tensor | None, dora_flags: torch.Tensor | None,
                   dropout: torch.Tensor | None, perm: torch.Tensor, keys: torch.Tensor,
                   seg: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None,
                   seed: torch.Tensor, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx or empty, packed dA ``[S, K]``, packed dB^T ``[S, N]``, dg ``[n, N]`` fp32
    or empty); rows of adapters absent from the batch get zeros. y: the forward's output
    (DoRA only)."""
    from .kernels.backward import DoraBackward
    from .kernels.multi_backward import multi_lora_da, multi_lora_dy
    from .kernels.multi_linear import MultiLowRank, multi_fused_linear

    groups = _groups(perm, keys, seg, offsets.shape[0])
    sd = int(seed)
    dora = DoraBackward(g, y, bias) if g is not None else None
    out = multi_lora_dy(dy, B, s, offsets, ranks, scales, groups, dora, dora_flags)
    ds, db = out[:2]
    da = multi_lora_da(ds, x, offsets, ranks, A.shape[0], A.dtype, groups, dropout, sd)
    if need_dx:
        low = MultiLowRank(ds, A, offsets, ranks, groups, dropout, sd)
        dx = multi_fused_linear(dy, weight, low, out_dtype=x.dtype, g_in=g)
    else:
        dx = x.new_empty((0,))
    dg = out[2] / g if g is not None else x.new_empty((0,), dtype=torch.float32)
    return dx, da.to(A.dtype), db.to(B.dtype), dg


@multi_lora_bwd.register_fake
def _(dy, x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys,
      seg, s, y, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dg = torch.empty_like(g) if g is not None else x.new_empty((0,), dtype=torch.float32)
    return dx, torch.empty_like(A), torch.empty_like(B), dg


def _setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg,
     _, seed) = inputs
    ctx.save_for_backward(x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout,
                          perm, keys, seg, output[1], output[0] if g is not None else None, seed)


def _backward(ctx, dy, _ds):
    (x, weight, bias, A, B, offsets, ranks, scales, g, dora_flags, dropout, perm, keys, seg, s,
     y, seed) = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    need_g = ctx.needs_input_grad[8]
    dx = da = db = dg = dweight = dbias = None
    if need_x or need_a or need_bb or need_g:
        dx, da, db, dg = multi_lora_bwd(dy, x, weight, bias, A, B, offsets, ranks, scales, g,
                                        dora_flags, dropout, perm, keys, seg, s, y, seed, need_x)
    if need_w:  # a trainable base weight is unusual: plain PyTorch, no fusion
        dyw = dy.float()
        if g is not None:  # DoRA rows: the gradient of g_a * x W^T
            g_rows = torch.cat([g, g.new_ones((1, g.shape[1]))])
            dyw = dyw * g_rows[torch.empty_like(keys).scatter_(0, perm, keys).long()]
        dweight = (dyw.t() @ x.float()).to(weight.dtype)
    if need_b:
        dbias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, None, None, (dg if need_g else None),
            None, None, None, None, None, None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- functional


def _check_index(index, m: int, n: int, device) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"adapter_index must be an integer tensor, got {type(index).__name__}")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"adapter_index must be an integer tensor, got {index.dtype}")
    if index.numel() != m:
        raise ValueError(f"adapter_index has {index.numel()} entries for {m} rows of x "
                         f"(shape {tuple(index.shape)}): one adapter per row is needed")
    if index.device != device:
        raise ValueError(f"adapter_index is on {index.device}, x on {device}")
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = index[(index < -1) | (index >= n)]
        if bad.numel():
            raise ValueError(f"adapter_index holds {bad[0].item()}, outside -1 .. {n - 1} "
                             f"(the bank has {n} adapters; -1 = base only)")
    elif m:  # no host sync: a device-side assert, raised at the next synchronization
        torch._assert_async(((index >= -1) & (index < n)).all(),
                            f"fastlora.multi_lora_linear: adapter_index outside -1 .. {n - 1}")


def _check_args(x, weight, bias, bank: PackedAdapters, kernel: bool) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("bank A", bank.A),
                    ("bank B", bank.B)):
        if t is not None:
            _check_float(name, t, kernel)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight expects {k} features")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bank.A.shape[1] != k or bank.B.shape[1] != n:
        raise ValueError(f"bank does not fit the base layer [{n}, {k}]: A is "
                         f"{list(bank.A.shape)} (needs [S, {k}]), B {list(bank.B.shape)} "
                         f"(needs [S, {n}])")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bank.A.dtype != bank.B.dtype:
        raise TypeError(f"bank A ({bank.A.dtype}) and B ({bank.B.dtype}) must share a dtype")
    devices = {t.device for t in (bank.A, bank.B, bank.offsets, bank.ranks, bank.scales)}
    if bank.magnitude is not None:
        devices |= {bank.magnitude.device, bank.weight_norm.device, bank.is_dora.device}
    if devices != {x.device}:
        raise ValueError(f"bank tensors are on {sorted(map(str, devices))}, x on {x.device}")


_warned_dora_dropout = False


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bank,
                      adapter_index: torch.Tensor, *, training: bool = False,
                      seed: int | None = None, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Per-row adapters: row i of x ``[..., K]`` uses adapter ``adapter_index[i]`` of the
    bank (-1: base only); weight ``[N, K]``, bias ``[N]`` or None; adapter_index an integer
    tensor with one entry per row (x's leading shape, or flattened). Returns ``[..., N]`` in
    x's dtype; each row equals ``fastlora.lora_linear`` (or ``dora_linear``) with its adapter.

    Differentiable in x, weight, bias and the bank's A, B and magnitude: each adapter's rows
    get the gradient of its own rows only (zero for adapters absent from the batch). In
    training, adapter i's rows see dropout ``bank.dropout[i]`` (mask from ``seed`` or
    ``generator``, regenerated in the backward); DoRA adapters with dropout in training run
    the PyTorch reference (``fastlora.reference.multi_lora_linear``), with a warning, as ``dora_linear``
    (that check reads the bank's DoRA flags on the host).
    Under autocast x, weight and bias are cast; the adapters' dots run in the bank's dtype.
    """
    global _warned_dora_dropout
    bank = bank.packed()
    _check_devices(x=x, weight=weight, bias=bias)
    x, weight, bias = _autocast(x.device.type, x, weight, bias)
    which = backend.choose(x)
    _check_args(x, weight, bias, bank, which == "triton")
    m = math.prod(x.shape[:-1])
    _check_index(adapter_index, m, bank.n, x.device)
    drop = training and bank.dropout is not None and any(p > 0.0 for p in bank.dropout)
    if drop and bank.is_dora is not None and any(
            d and p > 0.0 for d, p in zip(bank.is_dora.tolist(), bank.dropout)):
        if which == "triton" and not _warned_dora_dropout:
            warnings.warn("fastlora.multi_lora_linear: DoRA adapters with dropout in training run "
                          "the PyTorch reference (PEFT's two base GEMMs); not fused", stacklevel=2)
            _warned_dora_dropout = True
        which = "torch"
    if which == "torch":
        with torch.autocast(x.device.type, enabled=False):
            return reference.multi_lora_linear(x, weight, bias, bank, adapter_index,
                                                     training=drop, generator=generator)
    from .kernels.multi_meta import group_rows

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    groups = group_rows(adapter_index, bank.n)
    g = flags = None
    if bank.magnitude is not None:
        g = torch.where(bank.is_dora[:, None], bank.magnitude.float() / bank.weight_norm.detach(),
                        1.0).contiguous()
        flags = bank.is_dora.view(torch.int8)
    dropout, seed_t = None, torch.zeros((), dtype=torch.int64)
    if drop:
        dropout = torch.tensor(bank.dropout, dtype=torch.float32, device=x.device)
        seed_t = _seed(seed, generator)
    y, _ = multi_lora_fwd(x2, weight, bias, bank.A, bank.B, bank.offsets, bank.ranks,
                          bank.scales, g, flags, dropout, groups.perm, groups.keys, groups.seg,
                          int(bank.max_rank), seed_t)
    return y.view(*lead, weight.shape[0])
