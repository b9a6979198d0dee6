"""Launch plans: what a layer call decides, decided once per layer and input layout.

Before its two launches a ``lora_linear`` call decides the backend, checks its arguments,
picks the linear stage's implementation (``fastlora.choice.dispatch``) and builds every kernel
argument. All of that depends on

* the layer's tensors (weight, bias, lora_A, lora_B): their identity, storage and layout,
  the rule of ``fastlora.ops.cache`` without the version counter (a plan is stamped with them,
  holds none, and reads no values: an optimizer step keeps it);
* x's shape, strides, dtype, device and 16-byte alignment, the scale and dropout, whether
  autograd records the call, and the switches read per call (autocast, the
  ``FASTLORA_BACKEND`` / ``FASTLORA_IMPL`` / ``TRITON_INTERPRET`` variables, torch's fp32
  matmul precision, deterministic algorithms): the key a layer's plans are kept under.

A steady-state call is a key lookup, a stamp comparison, two allocations and the two
launches (``kernels.common.Launch``, the arguments but the tensors fixed). A call autograd
records (adapter or x trainable, the base frozen) runs the same launches inside a plain
``torch.autograd.Function`` (``_Recorded``): the custom op's Python autograd wrapper (pytree
flattening of 11 arguments, ~150 Python calls) is skipped. Its backward runs the op layer's
backward (``fastlora.ops.library.lora_linear_bwd``: the same kernels, configs and arguments)
as a plan too (``_Grads``), kept on the forward's plan per backward layout: dy's shape,
strides, dtype and alignment, which gradients autograd needs, and the switches (the dropout
seed is there when the plan's dropout is). A call no plan covers runs
``fastlora.lora_linear``: the PyTorch backend, autocast, a 4-bit weight, an empty x, a
trainable base weight or bias, a ``torch.func`` transform, ``torch.compile`` (which traces
the custom ops), a linear-stage choice not final yet (a CUDA graph being captured before
any measurement).
"""
from __future__ import annotations

import os

import torch

from . import backend, dispatch
from .. import functional, kernels
from ..kernels.common import on_device
from ..ops.cache import Cache, Stamped

__all__ = ["LoraPlans", "MultiPlans", "lora_linear"]

_SWITCHES = ("FASTLORA_BACKEND", "FASTLORA_IMPL", "TRITON_INTERPRET")
if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict):
    # os.environ's own table (what os.environ[...] reads and writes): a lookup without the
    # Python frames of os.environ.get, three per variable
    _ENV, _ENV_KEYS = os.environ._data, tuple(name.encode() for name in _SWITCHES)
else:  # pragma: no cover - Windows keeps upper-cased str keys
    _ENV, _ENV_KEYS = os.environ, _SWITCHES
_precision = torch._C._get_float32_matmul_precision
_deterministic = torch._C._get_deterministic_algorithms
_cuda_device = getattr(torch._C, "_cuda_getDevice", None)
_functorch_active = torch._C._are_functorch_transforms_active


class _LoraPlan:
    """The launches of one ``lora_linear`` call layout. ``linear``: the fused kernel's
    ``Launch``, or the chosen ``dispatch.Impl``; ``backwards``: the ``_Grads`` of the
    recorded calls' backwards, by backward layout (``_Recorded.backward``)."""
    __slots__ = ("shrink", "linear", "t_shape", "y_shape", "out_shape", "device", "scale",
                 "dropout_p", "backwards")

    def __call__(self, x, weight, bias, lora_A, lora_B, seed, generator):
        """The call in eval (nothing for autograd): y ``[..., N]``."""
        x2 = x.reshape(self.y_shape[0], -1)
        seed_t = (functional._seed(seed, generator, self.device) if self.dropout_p > 0.0
                  else None)
        return self.launch(x2, weight, bias, lora_A, lora_B, seed_t)[0].view(self.out_shape)

    def recorded(self, x, weight, bias, lora_A, lora_B, seed, generator):
        """The call, recorded by autograd (``_Recorded``): y ``[..., N]``."""
        x2 = x.reshape(self.y_shape[0], -1)
        seed_t = (functional._seed(seed, generator, self.device) if self.dropout_p > 0.0
                  else None)
        return _Recorded.apply(x2, lora_A, lora_B, (self, self, weight, bias, seed_t)).view(
            self.out_shape)

    def launch(self, x2, weight, bias, lora_A, lora_B, seed_t):
        """(y ``[M, N]``, T ``[M, r]`` fp32) on the plan's device."""
        if self.device.type == "cuda" and _cuda_device() != self.device.index:
            with torch.cuda.device(self.device):
                return self.launch(x2, weight, bias, lora_A, lora_B, seed_t)
        t = torch.empty(self.t_shape, dtype=torch.float32, device=self.device)
        self.shrink(x_ptr=x2, a_ptr=lora_A, t_ptr=t, seed_ptr=seed_t)
        if isinstance(self.linear, dispatch.Impl):
            return self.linear.launch(x2, weight.t(), kernels.term(t, lora_B.t(), self.scale),
                                      bias), t
        y = torch.empty(self.y_shape, dtype=x2.dtype, device=self.device)
        self.linear(a_ptr=x2, b_ptr=weight.t(), l_ptr=t, lb_ptr=lora_B.t(), bias_ptr=bias,
                    out_ptr=y)
        return y, t


class _Recorded(torch.autograd.Function):
    """A planned call autograd records: forward, the plan's two launches; backward, the
    plan's ``_Grads`` for the backward's layout (made by its first backward): the op
    layer's backward (``fastlora.ops.library.lora_linear_bwd``: dx, dA, dB from x, T and
    the dropout seed, saved as the custom op saves them) as kept launches. The base is
    frozen (weight and bias need no gradient), so they travel in ``rest`` = (the forward's
    launcher: the ``_LoraPlan``, or a ``_Maker`` that makes it; the ``_LoraPlan``; weight;
    bias; seed ``[1]`` or None): each argument of ``apply`` costs Python calls."""

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, rest):
        launcher, plan, weight, bias, seed_t = rest
        y, t = launcher.launch(x2, weight, bias, lora_A, lora_B, seed_t)
        ctx.save_for_backward(x2, lora_A, lora_B, t, seed_t, weight)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, lora_A, lora_B, t, seed_t, weight = ctx.saved_tensors
        plan, need = ctx.plan, ctx.needs_input_grad[:3]
        key = (dy.shape, dy.stride(), dy.dtype, dy.data_ptr() & 15, need,
               tuple(map(_ENV.get, _ENV_KEYS)), _precision())
        grads = plan.backwards.get(key)
        if grads is None:
            grads = _make_grads(dy, plan, key, x2, weight, lora_A, lora_B, t, seed_t, need)
        return grads(dy, x2, weight, lora_A, lora_B, t, seed_t) + (None,)


class _Grads:
    """The launches of one backward of a ``_LoraPlan``'s layout: ``dy`` (dS and dB, always),
    ``da`` (when dA is needed, else None), ``dx`` (when dx is needed: the fused kernel's
    ``Launch`` or the chosen ``dispatch.Impl``, else None); ``need_b``: whether dB is."""
    __slots__ = ("dy", "da", "dx", "need_b", "ds_shape", "db_shape", "da_shape", "dx_shape",
                 "dx_dtype", "keep", "dropout_p", "device")

    def __call__(self, dy, x2, weight, lora_A, lora_B, t, seed_t):
        """(dx ``[M, K]``, dA ``[r, K]``, dB ``[N, r]``; None where not needed) in their inputs'
        dtypes from dy ``[M, N]``, x2 ``[M, K]``, T ``[M, r]`` fp32 and the seed."""
        if self.device.type == "cuda" and _cuda_device() != self.device.index:
            with torch.cuda.device(self.device):
                return self(dy, x2, weight, lora_A, lora_B, t, seed_t)
        ds = torch.empty(self.ds_shape, dtype=torch.float32, device=self.device)
        db = torch.empty(self.db_shape, dtype=torch.float32, device=self.device)
        self.dy(dy_ptr=dy, b_ptr=lora_B, t_ptr=t, ds_ptr=ds, db_ptr=db)
        dx = da = None
        if self.da is not None:
            da = torch.empty(self.da_shape, dtype=torch.float32, device=self.device)
            self.da(ds_ptr=ds, x_ptr=x2, da_ptr=da, seed_ptr=seed_t)
            da = da.to(lora_A.dtype)
        if isinstance(self.dx, dispatch.Impl):
            dx = self.dx.launch(dy, weight, kernels.term(ds, lora_A, self.keep, self.dropout_p,
                                                         seed_t), None, self.dx_dtype)
        elif self.dx is not None:
            dx = torch.empty(self.dx_shape, dtype=self.dx_dtype, device=self.device)
            self.dx(a_ptr=dy, b_ptr=weight, l_ptr=ds, lb_ptr=lora_A, seed_ptr=seed_t,
                    out_ptr=dx)
        return dx, da, (db.to(lora_B.dtype) if self.need_b else None)


@on_device
def _make_grads(dy, plan: _LoraPlan, key: tuple, x2, weight, lora_A, lora_B, t, seed_t,
                need: tuple[bool, bool, bool]) -> _Grads:
    """A backward layout's first call: the ``_Grads`` of ``lora_linear_bwd``'s launches for
    it (dx's implementation from ``dispatch.CHOOSER``, as the op's ``dispatch.linear``
    chooses it), kept in ``plan.backwards[key]`` when that choice is final. ``need``: (dx,
    dA, dB) needed."""
    from ..kernels.backward import da_launch, dy_launch
    from ..kernels.linear import linear_launch

    (m, n), (k, r) = dy.shape, (x2.shape[1], lora_B.shape[1])
    grads = _Grads()
    grads.need_b, grads.device, grads.dx_dtype = need[2], plan.device, x2.dtype
    grads.ds_shape, grads.db_shape, grads.da_shape, grads.dx_shape = (m, r), (n, r), (r, k), (m, k)
    grads.keep, grads.dropout_p = 1.0 / (1.0 - plan.dropout_p), plan.dropout_p
    # the launches are made on this call's layouts (fresh outputs; a kept launch holds no
    # tensor) and run by grads itself, so the chooser's first call of a key times dx's
    # candidates on ds not computed yet (a timing reads no values)
    ds = torch.empty(grads.ds_shape, dtype=torch.float32, device=plan.device)
    db = torch.empty(grads.db_shape, dtype=torch.float32, device=plan.device)
    grads.dy = dy_launch(dy, lora_B, t, ds, db, plan.scale).without(
        "dy_ptr", "b_ptr", "t_ptr", "ds_ptr", "db_ptr")
    grads.da = grads.dx = None
    if need[1]:
        da = torch.empty(grads.da_shape, dtype=torch.float32, device=plan.device)
        grads.da = da_launch(ds, x2, da, lora_A.dtype, plan.dropout_p, seed_t).without(
            "ds_ptr", "x_ptr", "da_ptr", "seed_ptr")
    final = True
    if need[0]:
        low = kernels.term(ds, lora_A, grads.keep, plan.dropout_p, seed_t)
        impl, final = dispatch.CHOOSER.decide(
            dispatch.LinearArgs(dy, weight, low, out_dtype=x2.dtype), dispatch.LORA_DX)
        if impl.name != dispatch.DEFAULT:
            grads.dx = impl
        else:
            dx = torch.empty(grads.dx_shape, dtype=x2.dtype, device=plan.device)
            grads.dx = linear_launch(dy, weight, low, None, dx).without(
                "a_ptr", "b_ptr", "l_ptr", "lb_ptr", "seed_ptr", "out_ptr")
    if final:
        plan.backwards[key] = grads
    return grads


class _Maker:
    """A layout's first call: ``launch`` runs the launches while building them into
    ``plan``; ``final``: whether the linear stage's choice is final (only then is the plan
    kept)."""

    def __init__(self, plan: _LoraPlan):
        self.plan, self.final = plan, False

    def launch(self, x2, weight, bias, lora_A, lora_B, seed_t):
        from ..kernels.linear import linear_launch
        from ..kernels.shrink import shrink_launch

        plan = self.plan

        @on_device
        def first(x2):
            t = torch.empty(plan.t_shape, dtype=torch.float32, device=plan.device)
            shrink = shrink_launch(x2, lora_A, t, plan.dropout_p, seed_t)
            shrink()
            plan.shrink = shrink.without("x_ptr", "a_ptr", "t_ptr", "seed_ptr")
            low = kernels.term(t, lora_B.t(), plan.scale)
            impl, self.final = dispatch.CHOOSER.decide(
                dispatch.LinearArgs(x2, weight.t(), low, bias), dispatch.FORWARD)
            if impl.name != dispatch.DEFAULT:
                plan.linear = impl
                return impl.launch(x2, weight.t(), low, bias), t
            y = torch.empty(plan.y_shape, dtype=x2.dtype, device=plan.device)
            linear = linear_launch(x2, weight.t(), low, bias, y)
            linear()
            plan.linear = linear.without("a_ptr", "b_ptr", "l_ptr", "lb_ptr", "bias_ptr",
                                         "out_ptr")
            return y, t

        return first(x2)


def _make(x, weight, bias, lora_A, lora_B, scaling, p, training, seed, generator,
          record: bool):
    """(a plan for this call or None, this call's result); ``record``: autograd records
    the call (``_Recorded``)."""
    xc, w, _, a, _, which = functional._prepare(x, weight, bias, lora_A, lora_B, scaling,
                                                p if training else 0.0)
    m = xc.numel() // xc.shape[-1] if xc.dim() else 0
    if which != "triton" or not isinstance(w, torch.Tensor) or m == 0:
        return None, functional.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                            dropout_p=p, training=training, seed=seed,
                                            generator=generator)
    plan = _LoraPlan()
    plan.dropout_p = p if training else 0.0
    plan.scale = float(scaling)
    plan.device, plan.backwards = x.device, {}
    plan.t_shape, plan.y_shape = (m, a.shape[0]), (m, w.shape[0])
    plan.out_shape = (*x.shape[:-1], w.shape[0])
    maker = _Maker(plan)
    x2 = x.reshape(m, x.shape[-1])
    seed_t = functional._seed(seed, generator, x.device) if plan.dropout_p > 0.0 else None
    if record:
        y = _Recorded.apply(x2, lora_A, lora_B, (maker, plan, weight, bias, seed_t))
    else:
        y = maker.launch(x2, weight, bias, lora_A, lora_B, seed_t)[0]
    return (plan if maker.final else None), y.view(plan.out_shape)


class LoraPlans(Cache):
    """A layer's launch plans for ``lora_linear`` (see the module docstring), kept on the
    layer (``fastlora.nn.LoraLinear``, a patched PEFT layer's state); ``fastlora.refresh``
    clears them. A plan depends on the layout of the layer's tensors, not on their values:
    it is stamped without versions (an optimizer step keeps it)."""

    def __init__(self):
        self._plans: dict[tuple, Stamped] = {}

    def clear(self) -> None:
        self._plans.clear()

    def __call__(self, x: torch.Tensor, weight, bias, lora_A, lora_B, scaling: float, *,
                 dropout_p: float = 0.0, training: bool = False, seed: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``fastlora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, ...)`` through
        the plan of this call's key."""
        if (not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor)
                or torch.compiler.is_compiling()):
            return functional.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                          dropout_p=dropout_p, training=training, seed=seed,
                                          generator=generator)
        record = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad
                                              or lora_B.requires_grad)
        if torch.is_grad_enabled() and (
                weight.requires_grad or (bias is not None and bias.requires_grad)
                or (record and _functorch_active())):
            # a trainable base (unusual) or a torch.func transform: the custom ops
            return functional.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                          dropout_p=dropout_p, training=training, seed=seed,
                                          generator=generator)
        device = x.device
        key = (x.shape, x.stride(), x.dtype, device, x.data_ptr() & 15, bias is None,
               scaling, dropout_p if training else 0.0, torch.is_autocast_enabled(device.type),
               tuple(map(_ENV.get, _ENV_KEYS)), _precision(), _deterministic(), record)
        tensors = (weight, lora_A, lora_B) if bias is None else (weight, lora_A, lora_B, bias)
        hit = self._plans.get(key)
        if hit is not None and hit.valid_for(tensors, None):
            plan = hit.value
            if plan is None:  # lora_linear runs
                return functional.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                              dropout_p=dropout_p, training=training,
                                              seed=seed, generator=generator)
            if record:
                return plan.recorded(x, weight, bias, lora_A, lora_B, seed, generator)
            return plan(x, weight, bias, lora_A, lora_B, seed, generator)
        if key[8]:  # autocast: the casts are per call
            return functional.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                          dropout_p=dropout_p, training=training, seed=seed,
                                          generator=generator)
        plan, y = _make(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed,
                        generator, record)
        self._plans[key] = Stamped(tensors, None, plan, values=False)
        return y


def lora_linear(x: torch.Tensor, weight, bias, lora_A, lora_B, scaling: float, *,
                dropout_p: float = 0.0, training: bool = False, seed: int | None = None,
                generator: torch.Generator | None = None,
                plans: LoraPlans | None = None) -> torch.Tensor:
    """``fastlora.lora_linear`` through a layer's ``plans`` (None: nothing kept)."""
    if plans is None:
        return functional.lora_linear(x, weight, bias, lora_A, lora_B, scaling,
                                      dropout_p=dropout_p, training=training, seed=seed,
                                      generator=generator)
    return plans(x, weight, bias, lora_A, lora_B, scaling, dropout_p=dropout_p,
                 training=training, seed=seed, generator=generator)


class _MultiPlan:
    """The two launches of one decode-path ``multi_lora_linear`` call layout (eval):
    ``packed`` is the layer's ``PackedAdapters`` the plan was made for (routings are
    checked against it on every call)."""
    __slots__ = ("packed", "shrink", "linear", "t_shape", "y_shape", "out_shape", "device")

    def __call__(self, x, weight, bias, routing):
        routing.check(self.packed)  # tenant isolation: per call, O(1) while nothing changed
        if self.device.type == "cuda" and _cuda_device() != self.device.index:
            with torch.cuda.device(self.device):
                return self.run(x, weight, bias, routing)
        return self.run(x, weight, bias, routing)

    def run(self, x, weight, bias, routing):
        x2 = x.reshape(self.y_shape[0], -1)
        index = routing.row_index(self.y_shape[0])
        t = torch.empty(self.t_shape, dtype=torch.float32, device=self.device)
        self.shrink(x_ptr=x2, t_ptr=t, index_ptr=index)
        y = torch.empty(self.y_shape, dtype=x.dtype, device=self.device)
        self.linear(a_ptr=x2, b_ptr=weight.t(), l_ptr=t, bias_ptr=bias, out_ptr=y,
                    index_ptr=index)
        return y.view(self.out_shape)


def _make_multi(x, weight, bias, layer, routing):
    """(a plan for this decode call or None, this call's result)."""
    from ..kernels.multi_meta import gathers
    from ..adapters.routing import Routing

    bank = layer.packed()
    m = x.numel() // x.shape[-1] if x.dim() else 0
    result = functional.multi_lora_linear(x, weight, bias, bank, routing)  # checks it all
    if (not isinstance(routing, Routing) or not 0 < m or not gathers(m)
            or backend.choose(x, weight, bank.A, bank.B) != "triton"):
        return None, result
    from ..kernels.descriptors import bank_term, dora_bank
    from ..kernels.linear import multi_linear_launch
    from ..kernels.shrink import gather_splits, multi_shrink_launch
    from ..ops import library

    plan = _MultiPlan()
    plan.packed, plan.device = bank, x.device
    plan.t_shape = (gather_splits(x.shape[-1])[0], m, max(bank.max_rank, 1))
    plan.y_shape, plan.out_shape = (m, weight.shape[0]), (*x.shape[:-1], weight.shape[0])
    # the op's own descriptors (eval: no dropout; decode rows gather, nothing grouped)
    adapters, rows = library.multi_args(bank, routing, m, dropout=False, grouped=False)
    meta, rows = library.launch_meta(bank.A, bank.B, bank.magnitude, adapters, rows,
                                     bank.max_rank)

    @on_device
    def make(x2):
        t = torch.empty(plan.t_shape, dtype=torch.float32, device=x.device)
        y = torch.empty(plan.y_shape, dtype=x.dtype, device=x.device)
        plan.shrink = multi_shrink_launch(x2, bank.A, t, meta, rows).without(
            "x_ptr", "t_ptr", "index_ptr")
        plan.linear = multi_linear_launch(x2, weight.t(), bank_term(t, bank.B, meta, rows),
                                          bias, y, g_out=dora_bank(meta)).without(
            "a_ptr", "b_ptr", "l_ptr", "bias_ptr", "out_ptr", "index_ptr")

    make(x.reshape(m, x.shape[-1]))
    return plan, result


class MultiPlans(Cache):
    """A bank layer's launch plans for decode-path ``multi_lora_linear`` calls (rows
    gathered, eval), kept on an ``AdapterBank`` layer (``fastlora.serve``). A plan is
    stamped with the base weight and bias and every tensor of the layer's packed adapters
    (a write into the bank bumps their versions: the next call decides again); the routing
    is checked against the bank on every call. Other calls run ``multi_lora_linear``."""

    def __init__(self):
        self._plans: dict[tuple, Stamped] = {}

    def clear(self) -> None:
        self._plans.clear()

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias, layer, routing
                 ) -> torch.Tensor:
        """``fastlora.multi_lora_linear(x, weight, bias, layer, routing)``; layer: an
        ``AdapterBank`` layer (``layer.packed()``)."""
        if (torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or weight.requires_grad
                or (bias is not None and bias.requires_grad)))):
            return functional.multi_lora_linear(x, weight, bias, layer, routing)
        device = x.device
        key = (x.shape, x.stride(), x.dtype, device, x.data_ptr() & 15, bias is None,
               torch.is_autocast_enabled(device.type), tuple(map(_ENV.get, _ENV_KEYS)),
               _precision(), _deterministic())
        hit = self._plans.get(key)
        if hit is not None:
            plan = hit.value
            if (layer.A is plan.packed.A and layer.magnitude is plan.packed.magnitude
                    and hit.valid_for(_stamped(weight, bias, plan.packed), None)):
                return plan(x, weight, bias, routing)
        if key[6]:  # autocast: the casts are per call
            return functional.multi_lora_linear(x, weight, bias, layer, routing)
        plan, y = _make_multi(x, weight, bias, layer, routing)
        if plan is not None:
            self._plans[key] = Stamped(_stamped(weight, bias, plan.packed), None, plan)
        return y


def _stamped(weight, bias, bank) -> tuple:
    """The tensors a multi-adapter plan is stamped with: the base and the packed adapters."""
    tensors = (weight, bank.A, bank.B, bank.offsets, bank.ranks, bank.scales)
    if bias is not None:
        tensors += (bias,)
    if bank.magnitude is not None:
        tensors += (bank.magnitude, bank.weight_norm, bank.is_dora)
    return tensors
