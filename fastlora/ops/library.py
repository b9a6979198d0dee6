"""The Triton path of ``lora_linear`` as ``torch.library`` custom ops with autograd.

Custom ops (with fake implementations) let ``torch.compile(fullgraph=True)`` trace the
layer without a graph break. Saved for backward: x, T = drop(x) A^T (fp32 ``[M, r]``)
and the dropout seed; never the mask, a dropped copy of x, or anything ``M x N``.
The linear stages (forward and dx) run the implementation ``fastlora.choice.dispatch`` chooses
for their shapes, inside the ops' real implementations (so under ``torch.compile`` too).

The base weight is dense (``weight`` ``[N, K]``, ``quant`` empty) or bitsandbytes 4-bit:
``weight`` its packed data (uint8 ``[ceil(N*K / 2)]``), ``quant`` the tensors of its quant
state (absmax, code book, and for a double-quantized absmax absmax2, code2, offset),
``quant_meta`` ``[N, K, blocksize, blocksize2]``, ``compute_dtype`` the dtype its tiles are
dequantized to and the base GEMM runs in (x may have another float dtype). The 4-bit parts
are tensors (the offset too: the kernels load it), so nothing reads the device and a
CUDA graph can capture the ops; the backward saves those same tensors (never a dequantized
copy) and gives the 4-bit weight no gradient.

Multi-adapter (gathered) batches, behind ``fastlora.multi_lora_linear``: row i of x (leading
dims flattened) gets ``y_i = x_i W^T + bias + s_a x_i A_a^T B_a^T`` for its adapter
``a = adapter_index[i]`` (DoRA adapters: ``g_a * (x_i W^T + s_a x_i A_a^T B_a^T) + bias``,
``g_a = m_a / ||W + s_a B_a A_a||`` with the norm detached); ``-1`` means the base layer
only. The kernels (see ``fastlora.kernels.multi_meta``) take the rows either as a per-row
index (decode batches, nothing sorted: a shrink that gathers each row's rows of A and the
fused linear that gathers each row's rows of B, two launches) or grouped by adapter (a
shrink over segment tiles and the base GEMM over all rows with each tile's adapters added
in its prologue). DoRA's factor g is computed in the kernels from the magnitude and the
detached weight norm, so a forward launches nothing else. The backward (rows grouped; made
from the index when the forward gathered) gives dx and every adapter's own dA, dB (and
DoRA magnitude) gradient. Per-adapter dropout probabilities and the dropout seed are device
tensors the kernels load. The adapters' and rows' descriptors cross the op boundary as two
lists (``multi_args``, ``launch_meta``).
"""
from __future__ import annotations

import torch

from ..choice import dispatch
from .. import kernels


def _base(weight: torch.Tensor, quant: list[torch.Tensor], quant_meta: list[int] | None,
          compute_dtype: torch.dtype | None) -> torch.Tensor | kernels.Quant4:
    """The base weight as the kernels take it: W itself, or the 4-bit ``Quant4``."""
    if not quant:
        return weight
    return kernels.Quant4.from_parts(weight, quant, quant_meta, compute_dtype)


def _out_features(weight: torch.Tensor, quant_meta: list[int] | None) -> int:
    return quant_meta[0] if quant_meta else weight.shape[0]


@torch.library.custom_op("fastlora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    dropout_p: float, seed: torch.Tensor | None, quant: list[torch.Tensor],
                    quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``, weight ``[N, K]`` (or 4-bit, see the module docstring); returns y
    ``[M, N]`` (x's dtype), T ``[M, r]`` fp32. seed: int64 ``[1]`` on x's device (the
    kernels load it), None without dropout."""
    t = kernels.lora_shrink(x, lora_A, dropout_p, seed)
    w = _base(weight, quant, quant_meta, compute_dtype)
    y = dispatch.linear(dispatch.FORWARD, x, w.t(), kernels.term(t, lora_B.t(), scaling), bias)
    return y, t


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, quant, quant_meta,
      compute_dtype):
    return (x.new_empty((x.shape[0], _out_features(weight, quant_meta))),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastlora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, t: torch.Tensor,
                    scaling: float, dropout_p: float, seed: torch.Tensor | None, need_dx: bool,
                    quant: list[torch.Tensor], quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx ``[M, K]`` or empty, dA ``[r, K]``, dB ``[N, r]``) in their inputs' dtypes;
    the dropout mask is regenerated from the forward's seed tensor."""
    ds, db = kernels.lora_dy(dy, lora_B, t, scaling)
    da = kernels.lora_da(ds, x, lora_A.dtype, dropout_p, seed)
    if need_dx:
        low = kernels.term(ds, lora_A, 1.0 / (1.0 - dropout_p), dropout_p, seed)
        dx = dispatch.linear(dispatch.LORA_DX, dy, _base(weight, quant, quant_meta, compute_dtype),
                             low, out_dtype=x.dtype)
    else:
        dx = x.new_empty((0,))
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, seed, need_dx, quant,
      quant_meta, compute_dtype):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _save_base(ctx, weight, quant, quant_meta, compute_dtype) -> list[torch.Tensor]:
    """The base weight's tensors to save (what ``_saved_base`` splits off again)."""
    ctx.n_quant, ctx.quant_meta, ctx.compute_dtype = len(quant), quant_meta, compute_dtype
    return [weight, *quant]


def _saved_base(ctx, saved: tuple) -> tuple[tuple, torch.Tensor, list[torch.Tensor]]:
    """(the other saved tensors, weight, quant) from ``ctx.saved_tensors`` laid out as
    ``(*others, *_save_base(...))``."""
    split = len(saved) - 1 - ctx.n_quant
    return saved[:split], saved[split], list(saved[split + 1:])


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, quant, meta, compute = inputs
    ctx.save_for_backward(x, lora_A, lora_B, output[1], seed,
                          *_save_base(ctx, weight, quant, meta, compute))
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _base_grads(dy, x, weight, bias_dtype, need_w: bool, need_b: bool, g=None):
    """Gradients of the frozen-by-default base: weight (of ``g * x W^T`` when g is given;
    a trainable base weight is unusual: plain PyTorch, no fusion) and bias."""
    dweight = dbias = None
    if need_w:
        dy_w = dy if g is None else dy.float() * g
        dweight = dy_w.t().to(weight.dtype) @ x.to(weight.dtype)
    if need_b:
        dbias = dy.sum(0, dtype=torch.float32).to(bias_dtype)
    return dweight, dbias


def _backward(ctx, dy, _dt):
    (x, lora_A, lora_B, t, seed), weight, quant = _saved_base(ctx, ctx.saved_tensors)
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx = da = db = None
    if need_x or need_a or need_bb:
        dx, da, db = lora_linear_bwd(dy, x, weight, lora_A, lora_B, t, ctx.scaling,
                                     ctx.dropout_p, seed, need_x, quant, ctx.quant_meta,
                                     ctx.compute_dtype)
    dweight, dbias = _base_grads(dy, x, weight, ctx.bias_dtype, need_w, need_b)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, None, None, [None] * ctx.n_quant, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastlora::dora_norm", mutates_args=())
def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scaling: float, quant: list[torch.Tensor],
              quant_meta: list[int] | None) -> torch.Tensor:
    """``||weight + scaling * lora_B @ lora_A||`` per row, fp32 ``[N]``, no ``N x K`` buffer
    (a 4-bit weight dequantized to fp32 tile by tile)."""
    return kernels.dora_norm(_base(weight, quant, quant_meta, None), lora_A, lora_B, scaling)


@dora_norm.register_fake
def _(weight, lora_A, lora_B, scaling, quant, quant_meta):
    return weight.new_empty((_out_features(weight, quant_meta),), dtype=torch.float32)


@torch.library.custom_op("fastlora::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    g: torch.Tensor, quant: list[torch.Tensor],
                    quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``g * (x W^T + s T B^T) + bias``, g ``[N]`` fp32; returns y and T = x A^T (fp32)."""
    t = kernels.lora_shrink(x, lora_A)
    w = _base(weight, quant, quant_meta, compute_dtype)
    y = dispatch.linear(dispatch.FORWARD, x, w.t(), kernels.term(t, lora_B.t(), scaling),
                        bias, g_out=g)
    return y, t


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, g, quant, quant_meta, compute_dtype):
    return (x.new_empty((x.shape[0], _out_features(weight, quant_meta))),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastlora::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    t: torch.Tensor, y: torch.Tensor, g: torch.Tensor, scaling: float,
                    need_dx: bool, quant: list[torch.Tensor], quant_meta: list[int] | None,
                    compute_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA backward of ``g * dY`` plus ``dg = colsum(dY * (Y - bias)) / g``, one pass over dY.

    Returns (dx or empty, dA, dB, dg ``[N]`` fp32).
    """
    ds, db, dg = kernels.lora_dy(dy, lora_B, t, scaling, kernels.DoraBackward(g, y, bias))
    da = kernels.lora_da(ds, x, lora_A.dtype)
    if need_dx:
        dx = dispatch.linear(dispatch.DORA_DX, dy, _base(weight, quant, quant_meta, compute_dtype),
                             kernels.term(ds, lora_A, 1.0), out_dtype=x.dtype, g_in=g)
    else:
        dx = x.new_empty((0,))
    return dx, da.to(lora_A.dtype), db.to(lora_B.dtype), dg / g


@dora_linear_bwd.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, t, y, g, scaling, need_dx, quant, quant_meta,
      compute_dtype):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(g)


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, g, quant, meta, compute = inputs
    ctx.save_for_backward(x, bias, lora_A, lora_B, output[1], output[0], g,
                          *_save_base(ctx, weight, quant, meta, compute))
    ctx.scaling = scaling


def _dora_backward(ctx, dy, _dt):
    (x, bias, lora_A, lora_B, t, y, g), weight, quant = _saved_base(ctx, ctx.saved_tensors)
    need_x, need_w, need_b, need_a, need_bb, _, need_g = ctx.needs_input_grad[:7]
    dx = da = db = dg = None
    if need_x or need_a or need_bb or need_g:
        dx, da, db, dg = dora_linear_bwd(dy, x, weight, bias, lora_A, lora_B, t, y, g,
                                         ctx.scaling, need_x, quant, ctx.quant_meta,
                                         ctx.compute_dtype)
    # the norm is detached: W's gradient is that of g * x W^T
    dweight, dbias = _base_grads(dy, x, weight, bias.dtype if bias is not None else None,
                                 need_w, need_b, g)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), None, (dg if need_g else None), [None] * ctx.n_quant,
            None, None)


dora_linear_fwd.register_autograd(_dora_backward, setup_context=_dora_setup_context)


# ---------------------------------------------------------------- multi-adapter batches
#
# A multi-adapter call's adapter and row descriptors cross the op boundary as two lists of
# optional tensors, in the orders named here; ``multi_args`` makes them from a
# ``PackedAdapters`` and a ``Routing`` and ``launch_meta`` turns them back into the
# launchers' ``PackedAdapters`` (unchecked: ``PackedAdapters.trusted``) and ``RowMap``, the
# only two places that know the orders. A, B and DoRA's magnitude are differentiable: they
# stay top-level arguments (torch treats a list holding a None as one opaque input, so a
# tensor inside it would get no gradient).

ADAPTER_FIELDS = ("offsets", "ranks", "scales", "dropout", "weight_norm", "is_dora")  # the bank's
ROW_FIELDS = ("index", "perm", "keys", "seg")  # RowMap's index, then its RowGroups'


def multi_args(bank, routing, m: int, *, dropout: bool, grouped: bool
               ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(adapters, rows) of a call on ``m`` rows as ``multi_lora_fwd`` takes them.

    adapters (``ADAPTER_FIELDS``): the bank's (a ``PackedAdapters``) offsets, ranks int32
    ``[n]``, scales fp32 ``[n]``, dropout fp32 ``[n]`` (``dropout``: applied in this call,
    else None: the one place that decides it), the detached DoRA weight_norm fp32 ``[n, N]``
    and is_dora bool ``[n]`` (None without DoRA). rows (``ROW_FIELDS``): from the
    ``Routing``, index int32 ``[m]`` when the batch gathers (``m <= GATHER_MAX_M``) else
    None; perm, keys ``[m]`` and seg ``[n + 2]`` (the rows grouped by adapter) when it does
    not gather or when ``grouped`` (the backward, which works on grouped rows, will run),
    else None."""
    dora = bank.is_dora is not None
    adapters = [bank.offsets, bank.ranks, bank.scales, bank.dropout if dropout else None,
                bank.weight_norm.detach() if dora else None, bank.is_dora]
    index = routing.row_index(m) if kernels.multi_meta.gathers(m) else None
    if index is None or grouped:
        groups = routing.groups(m)
        return adapters, [index, groups.perm, groups.keys, groups.seg]
    return adapters, [index, None, None, None]


def launch_meta(A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None,
                adapters: list[torch.Tensor | None], rows: list[torch.Tensor | None],
                max_rank: int) -> tuple[kernels.PackedAdapters, kernels.RowMap]:
    """The launchers' (``PackedAdapters``, ``RowMap``) of the op's A, B, magnitude and
    ``multi_args``' lists, not checked again (``PackedAdapters.trusted``)."""
    meta = kernels.PackedAdapters.trusted(A=A, B=B, max_rank=max_rank, magnitude=magnitude,
                                          **dict(zip(ADAPTER_FIELDS, adapters)))
    index, perm, keys, seg = rows  # ROW_FIELDS: RowMap's index, RowGroups' fields
    groups = kernels.RowGroups(perm, keys, seg) if perm is not None else None
    return meta, kernels.RowMap(adapters[0].shape[0], index, groups)


def _multi_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None,
                   adapters: list[torch.Tensor | None], rows: list[torch.Tensor | None],
                   max_rank: int, seed: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of x ``[M, K]`` gets its adapter's term (``fastlora.multi_lora_linear``): A
    ``[S, K]``, B ``[S, N]`` packed, magnitude ``[n, N]`` (DoRA) or None, adapters and rows
    as ``multi_args`` makes them, seed int64 ``[1]`` with dropout. Returns y ``[M, N]``
    (x's dtype) and S ``[chunks, M, max_rank]`` fp32 (the scaled shrink, rows in batch
    order, as partial sums over K chunks)."""
    bank, row_map = launch_meta(A, B, magnitude, adapters, rows, max_rank)
    s = kernels.multi_lora_shrink(x, A, bank, row_map, seed)
    y = kernels.multi_fused_linear(x, weight.t(), kernels.bank_term(s, B, bank, row_map), bias,
                                   g_out=kernels.dora_bank(bank))
    return y, s


multi_lora_fwd = torch.library.custom_op("fastlora::multi_lora_fwd", _multi_forward,
                                         mutates_args=())


@multi_lora_fwd.register_fake
def _(x, weight, bias, A, B, magnitude, adapters, rows, max_rank, seed):
    from ..kernels.shrink import gather_splits

    chunks = gather_splits(x.shape[1])[0] if rows[0] is not None else 1
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((chunks, x.shape[0], max(max_rank, 1)), dtype=torch.float32))


@torch.library.custom_op("fastlora::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                   magnitude: torch.Tensor | None, adapters: list[torch.Tensor | None],
                   rows: list[torch.Tensor | None], s: torch.Tensor, y: torch.Tensor | None,
                   seed: torch.Tensor | None, need_dx: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx or empty, packed dA ``[S, K]``, packed dB^T ``[S, N]``, d magnitude
    ``[n, N]`` or empty); rows of adapters absent from the batch get zeros. s, y: the
    forward's outputs (y: DoRA only)."""
    bank, row_map = launch_meta(A, B, magnitude, adapters, rows, s.shape[2])
    row_map = row_map.grouped()
    out = kernels.multi_lora_dy(dy, B, s.sum(0) if s.shape[0] > 1 else s[0], bank, row_map, y,
                                bias)
    ds, db = out[:2]
    da = kernels.multi_lora_da(ds, x, bank, row_map, A.shape[0], A.dtype, seed)
    if need_dx:
        low = kernels.bank_term(ds[None], A, bank, row_map, seed)
        dx = kernels.multi_fused_linear(dy, weight, low, out_dtype=x.dtype,
                                        g_in=kernels.dora_bank(bank))
    else:
        dx = x.new_empty((0,))
    if magnitude is not None:  # d magnitude = dg / norm, dg = colsum(dY * (Y - bias)) / g
        dmag = torch.where(bank.is_dora[:, None], out[2] / magnitude.float(), 0.0)
        dmag = dmag.to(magnitude.dtype)
    else:
        dmag = x.new_empty((0,))
    return dx, da.to(A.dtype), db.to(B.dtype), dmag


@multi_lora_bwd.register_fake
def _(dy, x, weight, bias, A, B, magnitude, adapters, rows, s, y, seed, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dmag = torch.empty_like(magnitude) if magnitude is not None else x.new_empty((0,))
    return dx, torch.empty_like(A), torch.empty_like(B), dmag


def _row_factors(bank: kernels.PackedAdapters, row_map: kernels.RowMap) -> torch.Tensor:
    """DoRA's g of every row's adapter, fp32 ``[M, N]`` (1 on base rows and plain adapters)."""
    n = bank.n
    g = torch.where(bank.is_dora[:, None], bank.magnitude.float() / bank.weight_norm, 1.0)
    g = torch.cat([g, g.new_ones((1, g.shape[1]))])
    if row_map.gather:
        row_key = torch.where((row_map.index < 0) | (row_map.index >= n), n, row_map.index)
    else:
        groups = row_map.groups
        row_key = torch.empty_like(groups.keys).scatter_(0, groups.perm.long(), groups.keys)
    return g[row_key.long()]


def _multi_save(ctx, inputs, output) -> None:
    """Saves what ``_multi_grads`` reads (``inputs``: ``multi_lora_fwd``'s, output (y, S))."""
    x, weight, bias, A, B, magnitude, adapters, rows, _, seed = inputs
    ctx.save_for_backward(x, weight, bias, A, B, magnitude, output[1],
                          output[0] if magnitude is not None else None, seed, *adapters, *rows)


def _multi_grads(ctx, dy, needs) -> tuple:
    """(dx, d weight, d bias, dA, dB, d magnitude), None where ``needs`` (bools in that order)
    says no gradient is wanted."""
    saved = ctx.saved_tensors
    x, weight, bias, A, B, magnitude, s, y, seed = saved[:9]
    adapters = list(saved[9:9 + len(ADAPTER_FIELDS)])
    rows = list(saved[9 + len(ADAPTER_FIELDS):9 + len(ADAPTER_FIELDS) + len(ROW_FIELDS)])
    need_x, need_w, need_b, need_a, need_bb, need_m = needs
    dx = da = db = dmag = dweight = dbias = None
    if need_x or need_a or need_bb or need_m:
        dx, da, db, dmag = multi_lora_bwd(dy, x, weight, bias, A, B, magnitude, adapters, rows,
                                          s, y, seed, need_x)
    if need_w:  # a trainable base weight is unusual: plain PyTorch, no fusion
        dyw = dy.float()
        if magnitude is not None:  # DoRA rows: the gradient of g_a * x W^T
            dyw = dyw * _row_factors(*launch_meta(A, B, magnitude, adapters, rows, s.shape[2]))
        dweight = (dyw.t() @ x.float()).to(weight.dtype)
    if need_b:
        dbias = dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return ((dx if need_x else None), dweight, dbias, (da if need_a else None),
            (db if need_bb else None), (dmag if need_m else None))


def _no_grads(need) -> list[None] | None:
    """The gradient of a list input without differentiable tensors, given its
    ``needs_input_grad`` entry: torch flattens a list of tensors (one None per entry) but
    takes a list holding a None as one opaque input (one None)."""
    return [None] * len(need) if isinstance(need, list) else None


def _multi_backward(ctx, dy, _ds):
    needs = ctx.needs_input_grad
    return (*_multi_grads(ctx, dy, needs[:6]), _no_grads(needs[6]), _no_grads(needs[7]), None,
            None)


multi_lora_fwd.register_autograd(_multi_backward, setup_context=_multi_save)


class _MultiRecorded(torch.autograd.Function):
    """``multi_lora_fwd`` as eager autograd records it: the same forward, saved tensors and
    backward, without the custom op's Python autograd wrapper (which flattens and
    unflattens every argument and list as a pytree for lists of tensors: about 160 Python
    calls per forward and 120 per backward). ``rest``: (adapters, rows, max_rank, seed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, rest):
        inputs = (x, weight, bias, A, B, magnitude, *rest)
        y, s = _multi_forward(*inputs)
        _multi_save(ctx, inputs, (y, s))
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_multi_grads(ctx, dy, ctx.needs_input_grad[:6]), None)


_functorch_active = torch._C._are_functorch_transforms_active


def multi_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None,
               adapters: list[torch.Tensor | None], rows: list[torch.Tensor | None],
               max_rank: int, seed: torch.Tensor | None, *, record: bool) -> torch.Tensor:
    """y ``[M, N]`` of ``multi_lora_fwd``: the custom op (traced by ``torch.compile``, run
    under ``torch.func`` transforms and without autograd), or ``_MultiRecorded`` when eager
    autograd records the call (``record``: grad mode on and some input requires grad)."""
    if record and not torch.compiler.is_compiling() and not _functorch_active():
        return _MultiRecorded.apply(x, weight, bias, A, B, magnitude,
                                    (adapters, rows, max_rank, seed))
    return multi_lora_fwd(x, weight, bias, A, B, magnitude, adapters, rows, max_rank, seed)[0]
