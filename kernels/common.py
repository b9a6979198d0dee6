"""Helpers shared by the kernels: grouped tile order, in-kernel dropout, autotune configs."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .capture import guard


class Launch:
    """One kernel launch decided once: the (autotuned) kernel, its grid and its arguments.
    ``launch()`` runs it as made; ``launch.without(*names)`` is the same launch with the
    named tensors left to each call (``launch(**tensors)``): a launch plan keeps the
    decisions and the layout facts, never the tensors of one call. ``slots`` names where a
    tensor sits inside a descriptor argument (``"a_ptr": ("a", "ptr")``: member ptr of
    argument a); a name without a slot is an argument itself.

    A call with tensors runs no Python function besides ``__call__`` and ``_with``: the
    slots are kept as member indices and the descriptors rebuilt with ``tuple.__new__``
    (a NamedTuple's own constructor and ``_replace`` are Python functions, a few per
    tensor, paid on every decode step)."""
    __slots__ = ("kernel", "grid", "args", "slots", "_paths")

    def __init__(self, kernel, grid, args: dict, slots: dict[str, tuple[str, ...]] | None = None):
        self.kernel, self.grid, self.args, self.slots = kernel, grid, args, slots or {}
        self._paths = {}  # name -> (argument, member indices) for the slots args has
        for name, path in self.slots.items():
            desc, indices = args.get(path[0]), []
            for member in path[1:]:  # a slot this launch's descriptors lack is left out
                if member not in getattr(desc, "_fields", ()):
                    break
                indices.append(type(desc)._fields.index(member))
                desc = desc[indices[-1]]
            else:
                self._paths[name] = (path[0], tuple(indices))

    def _with(self, tensors: dict) -> dict:
        args = dict(self.args)
        paths = self._paths
        for name, t in tensors.items():
            if name not in self.slots:
                args[name] = t
                continue
            top, indices = paths[name]
            if not indices:
                args[top] = t
                continue
            chain = [args[top]]
            for i in indices[:-1]:
                chain.append(chain[-1][i])
            for desc, i in zip(reversed(chain), reversed(indices)):
                t = _new_tuple(type(desc), (*desc[:i], t, *desc[i + 1:]))
            args[top] = t
        return args

    def without(self, *names: str) -> "Launch":
        """The launch with the named tensors left to each call (None in their slots)."""
        names = [name for name in names if name not in self.slots or name in self._paths]
        args = self._with(dict.fromkeys(names))
        for name in names:
            if name not in self.slots:
                del args[name]
        return Launch(self.kernel, self.grid, args, self.slots)

    def __call__(self, **tensors) -> None:
        self.kernel[self.grid](**(self._with(tensors) if tensors else self.args))


_new_tuple = tuple.__new__  # a NamedTuple made from its members, without its Python __new__


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_device(launcher):
    """Decorate a launcher so that its kernels run on the CUDA device of its first (tensor)
    argument: Triton launches on the *current* device and stream, so without this guard a
    layer on ``cuda:1`` would launch on ``cuda:0``. Every launcher goes through it."""
    @functools.wraps(launcher)
    def guarded(first: torch.Tensor, *args, **kwargs):
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)
    return guarded


# fp32 accuracy on tensor cores: each fp32 operand split into two TF32 parts, three
# products (~2^-21 relative error each, against 2^-24 for an fp32 FMA). Full-fp32 "ieee"
# dots run on FMA units and spill kilobytes of registers per thread in these kernels.
FULL_FP32 = "tf32x3"

# a torch float dtype as a kernel's dtype constexpr (DOT_DTYPE, Q4_DTYPE)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def fp32_precision() -> str:
    """``tl.dot`` precision for fp32 operands, following PyTorch's matmul setting:
    fp32 accuracy (``FULL_FP32``) under ``torch.set_float32_matmul_precision("highest")``
    (the default, which PEFT's fp32 adapters run at), TF32 otherwise. 16-bit operands
    ignore it."""
    return FULL_FP32 if torch.get_float32_matmul_precision() == "highest" else "tf32"


# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for fp32 x and W at FULL_FP32:
# the tf32x3 splits of both operand tiles fit in registers only with short K steps
FP32_GEMM_SHAPES = [(64, 64, 32, 4, 3), (32, 64, 32, 4, 3), (16, 64, 64, 4, 3), (16, 32, 64, 4, 3)]


def tune(kernel, configs: list[triton.Config], key: list[str], prune: bool = True,
         restore: list[str] | None = None):
    """``kernel`` autotuned over ``configs`` on ``key``, pruned by M (``prune_by_m``);
    ``restore`` names arguments a launch updates in place (tensors, or descriptors whose
    first member is the tensor): autotuning reruns it on them, so each run starts from a
    copy of what the launch found. Never tunes inside a CUDA-graph capture (``capture.guard``)."""
    return guard(triton.autotune(configs=configs, key=key, **(_restoring(restore) if restore else {}),
                                 prune_configs_by={"early_config_prune": prune_by_m} if prune else None
                                 )(kernel))


def _tensor(arg) -> torch.Tensor:
    """The tensor of a kernel argument: itself, or a descriptor's first member."""
    return arg[0] if isinstance(arg, tuple) else arg


def _restoring(names: list[str]) -> dict:
    """The autotuner's pre/post hooks that restore the tensors of ``names`` after each
    benchmarked run (Triton's own ``restore_value`` takes plain tensor arguments only)."""
    copies = {}

    def pre_hook(nargs, reset_only=False):
        if not reset_only:
            copies.update({name: _tensor(nargs[name]).clone() for name in names})

    def post_hook(nargs, exception):
        for name, saved in copies.items():
            _tensor(nargs[name]).copy_(saved)
        copies.clear()

    return dict(pre_hook=pre_hook, post_hook=post_hook)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 in the interpreter, so that the tests
    exercise the split reductions and the persistent tile loops."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def rank_block(r: int) -> int:
    """Rank tile: r padded to a power of two, at least 16 (``tl.dot``), at most 64."""
    return min(max(16, next_pow2(r)), 64)


def m_bucket(m: int) -> int:
    """Autotune key for the row count: tuning once per power of two, not once per M."""
    return min(next_pow2(m), 8192)


def configs(names: tuple[str, ...], shapes: list[tuple], interp: dict,
            zero: tuple[str, ...] = (), **fixed) -> list[triton.Config]:
    """The GPU autotune configs, one per shape ``(*block sizes in names' order, warps,
    stages)`` with the constexprs ``fixed``, or the single small ``interp`` one the
    interpreter runs.

    ``zero`` names accumulator arguments that every launch (autotuning runs included)
    must find zeroed: a per-config pre-hook zeroes them, which unlike ``reset_to_zero``
    also covers the launch that follows autotuning on every Triton version.
    """
    if interpreting():
        chosen = [triton.Config(interp)]
    else:
        chosen = [triton.Config({**dict(zip(names, shape[:-2])), **fixed}, num_warps=shape[-2],
                                num_stages=shape[-1]) for shape in shapes]
    if zero:
        def hook(nargs):
            for name in zero:
                if nargs[name] is not None:  # an absent accumulator is None
                    _tensor(nargs[name]).zero_()
        for config in chosen:
            config.pre_hook = hook
    return chosen


def gemm_configs(shapes: list[tuple]) -> list[triton.Config]:
    """``configs`` of the fused GEMMs: shapes ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``."""
    return configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), shapes,
                   dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4), GROUP_M=8)


def prune_by_m(configs, named_args, **kwargs):
    """Drop configs whose BLOCK_M is far above M (decode shapes), keeping at least one.
    (M arrives among ``named_args`` when passed by position, in ``kwargs`` by keyword.)"""
    cap = max(16, next_pow2(named_args["M"] if "M" in named_args else kwargs["M"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (tile_m, tile_n), GROUP_M row tiles at a time (L2 reuse)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % width) % size_m
    tile_n = (pid % width) // size_m
    return tile_m, tile_n


@triton.jit
def dropout_keep(seed, rows, col0, n_cols, p, BLOCK_C: tl.constexpr):
    """Keep-mask [len(rows), BLOCK_C] of dropout on a ``[*, n_cols]`` input, for columns
    ``col0 .. col0 + BLOCK_C`` (col0 a multiple of 4). ``seed``: the value kernels load
    from their int64 seed pointer (a device tensor, so a replayed CUDA graph that redraws
    it gets a new mask).

    One Philox call gives four uniforms: call #(i * ceil(n_cols / 4) + j // 4) of ``seed``
    serves columns j..j+3 of row i, so any tile of the same input regenerates the same
    bits at a quarter of the cost of one call per element. An element is kept when its
    uniform is >= p. ``rows`` is an int64 vector (offsets beyond 2**31 are fine).
    """
    groups = rows[:, None] * ((n_cols + 3) // 4) + (col0 // 4 + tl.arange(0, BLOCK_C // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, groups)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (rows.shape[0], BLOCK_C))
    return tl.random.uint_to_uniform_float(bits) >= p


@triton.jit
def low_rank_tile(l_ptr, lb_ptr, rows, cols, row_in, col_in, R, stride_lm, stride_lr,
                  stride_lbr, stride_lbn, scale, seed_ptr, dropout_p, col0, N,
                  DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
    """``scale * keep * (l[rows] @ lb[:, cols])`` for one output tile, fp32
    ``[len(rows), BLOCK_N]``: l ``[M, R]`` fp32, lb ``[R, N]`` (the dot runs in its dtype).

    With DROPOUT, keep is the keep-mask (seed loaded from ``seed_ptr``) of an ``[M, N]``
    input (the dx pass) at columns ``col0 ..`` (``cols`` are col0 + 0..BLOCK_N-1, int64).
    """
    acc = tl.zeros((rows.shape[0], BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_in = ranks < R
        lt = tl.load(l_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr,
                     mask=row_in[:, None] & rank_in[None, :], other=0.0)
        lb = tl.load(lb_ptr + ranks[:, None] * stride_lbr + cols[None, :] * stride_lbn,
                     mask=rank_in[:, None] & col_in[None, :], other=0.0)
        acc = tl.dot(lt.to(lb.dtype), lb, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = tl.where(dropout_keep(tl.load(seed_ptr), rows, col0, N, dropout_p, BLOCK_N), acc,
                       0.0)
    return acc * scale


@triton.jit
def shrink_tile(x_ptr, rows, row_in, stride_xm, stride_xk, a_ptr, a_rows, rank_in,
                stride_ar, stride_ak, K, seed_ptr, dropout_p, DROPOUT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``keep(x[rows]) @ A[a_rows]^T`` for one tile, fp32 ``[len(rows), len(a_rows)]``
    (the 1 / (1 - p) factor is the caller's). ``rows``/``a_rows`` are int64 row numbers of
    x ``[*, K]`` and A ``[*, K]``; the dot runs in A's dtype, as PEFT casts x to it."""
    acc = tl.zeros((rows.shape[0], a_rows.shape[0]), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_in = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_in[:, None] & col_in[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(dropout_keep(seed, rows, k0, K, dropout_p, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + a_rows[None, :] * stride_ar + cols[:, None] * stride_ak,
                    mask=col_in[:, None] & rank_in[None, :], other=0.0)
        acc = tl.dot(x.to(a.dtype), a, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dora_factor(g_ptr, mag_ptr, norm_ptr, stride_mag, stride_norm, key, dora, cols, col_in,
                MULTI: tl.constexpr):
    """DoRA's column factor at ``cols`` (int64 vector) as fp32: ``g[cols]`` ``[1, C]`` of a
    given g (one adapter), or with MULTI ``magnitude[key] / weight_norm[key]`` where
    ``dora`` holds and 1 elsewhere, for ``key`` / ``dora`` ``[BLOCK_M, 1]`` (a row's
    adapter) or scalars (one adapter of a bank); magnitude and weight_norm rows have unit
    column stride."""
    if MULTI:
        mask = tl.where(dora, col_in[None, :], False)  # (the interpreter's & of a scalar
        # and a vector mask is no mask)
        mag = tl.load(mag_ptr + key * stride_mag + cols[None, :], mask=mask, other=1.0)
        norm = tl.load(norm_ptr + key * stride_norm + cols[None, :], mask=mask, other=1.0)
        return mag.to(tl.float32) / norm
    else:
        return tl.load(g_ptr + cols, mask=col_in, other=0.0)[None, :]


@triton.jit
def dora_g(g, key, dora, cols, col_in, MULTI: tl.constexpr):
    """DoRA's column factor (``dora_factor``) from ``g``: one adapter's g ``[N]`` fp32 or,
    with MULTI, a ``descriptors.DoraBank``."""
    if MULTI:
        factor = dora_factor(None, g.magnitude, g.weight_norm, g.stride_mag, g.stride_norm, key,
                             dora, cols, col_in, True)
    else:
        factor = dora_factor(g, None, None, 0, 0, key, dora, cols, col_in, False)
    return factor
