"""What ``python -m fastlora check-kernels`` compiles: every kernel, in the dtype, flag and
precision variants the launchers use, with the autotune configs the launcher picks for them.

fp32 operands (PEFT's default fp32 adapters) come in both precisions the launchers pass:
``FULL_FP32`` (tf32x3, torch's default "highest" matmul precision) and ``tf32`` ("high").
Signatures name each argument's Triton type. As Triton does at run time for contiguous
LLM-sized tensors, unit strides are specialized to 1 and pointers, other strides and the
N/K sizes are marked divisible by 16. The sm_90 TMA kernel's tensor descriptors are typed
with the config's block shapes, and the kernel is reported skipped on other targets."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton.language as tl

from . import backward, dora, linear, linear_tma, shrink
from .common import FULL_FP32, TL_DTYPES
from .descriptors import BankTerm, DoraBank, Mat, Quant4, Rows, Segments, Term


_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class AotVariant:
    """One compilation of ``kernel``: argument types, constexpr values, a label."""
    kernel: object  # the @triton.autotune-wrapped kernel the launcher picks
    label: str
    types: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    only: int | None = None  # the one compute capability it is built for; others are skipped
    # types that depend on the autotune config (tensor descriptors carry their block shape)
    config_types: Callable[[dict], dict[str, str]] | None = None
    dots: bool = True  # False: no tl.dot (CUDA-core products), so no tensor cores expected

    def all_types(self, config: dict) -> dict[str, str]:
        return {**self.types, **(self.config_types(config) if self.config_types else {})}

    def all_constexprs(self, config: dict) -> dict[str, object]:
        """The variant's constexprs and config values; arguments a launch leaves at their
        defaults (the multi-adapter ones, in single-adapter launches) keep them."""
        types = self.all_types(config)
        params = inspect.signature(self.kernel.fn.fn).parameters.values()
        unset = {p.name: p.default for p in params
                 if p.default is not p.empty and p.name not in types}
        return {**unset, **self.constexprs, **config}

    def compile_args(self, config: dict) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) of ``triton.compile``'s ``ASTSource`` for one
        autotune config: each argument's type, a descriptor's as the same NamedTuple of its
        members' types (its constexpr members, ``tl.constexpr`` values or None, by path);
        pointers, strides and the N/K sizes marked divisible by 16."""
        types, values = self.all_types(config), self.all_constexprs(config)
        signature, constexprs, aligned = {}, {}, []
        for i, name in enumerate(self.kernel.fn.arg_names):
            if name in types:
                signature[name] = _split(types[name], (i,), name, constexprs, aligned)
            else:
                signature[name] = "constexpr"
                if name in values:
                    constexprs[(i,)] = values[name]
        return signature, constexprs, {path: [["tt.divisibility", 16]] for path in aligned}


def _split(value, path: tuple[int, ...], field: str, constexprs: dict, aligned: list):
    """The signature entry of one argument (or descriptor member) at ``path``: a type string
    as it is, a descriptor member by member; constexpr members go to ``constexprs`` and the
    paths of pointers, strides and N/K to ``aligned``."""
    if isinstance(value, tuple):
        return type(value)(*(_split(v, (*path, i), f, constexprs, aligned)
                             for i, (f, v) in enumerate(zip(value._fields, value))))
    if isinstance(value, str):
        if value.startswith("*") or field.startswith("stride") or field in ("N", "K"):
            aligned.append(path)
        return value
    constexprs[path] = value.value if isinstance(value, tl.constexpr) else value
    return "constexpr"


def _segments(rows: str) -> Segments:
    """The ``Segments`` type of a multi-adapter launch: rows "sorted" (segment tiles) or
    "gather" (the bank's facts only, rows through a ``Rows``)."""
    sorted_rows = "*i32" if rows == "sorted" else None
    return Segments(sorted_rows, sorted_rows, "*i32", "*i32", "*fp32", "i32",
                    tl.constexpr(64 if rows == "sorted" else 2))


def _shrink(x: str, a: str, dropout: bool, precision: str = FULL_FP32,
            rows: str | None = None) -> AotVariant:
    """rows: None (one adapter), "sorted" or "gather" (multi-adapter rows)."""
    unit = ("stride_xk", "stride_ak", "stride_tr")
    types = dict(x=_mat(x, "x", "mk", unit), a=_mat(a, "a", "rk", unit),
                 t=_mat("fp32", "t", "mr", unit), M="i32", K="i32", R="i32", M_BUCKET="i32",
                 dropout_p="fp32", keep_scale="fp32", **({"seed": "*i64"} if dropout else {}))
    const = dict(DROPOUT=dropout, BLOCK_R=16, PRECISION=precision, seed=None)
    if rows:
        types.update(stride_ts="i32", k_chunk="i32", segs=_segments(rows),
                     **({"p": "*fp32"} if dropout else {}))
        const.update(MULTI=True, GATHER=rows == "gather", p=None)
        if rows == "gather":
            types["gathered"] = Rows("*i32", None, None, "i32", tl.constexpr(True))
    label = f"{rows + ' ' if rows else ''}x={x} A={a} dropout={dropout} {precision}"
    return AotVariant(shrink.KERNELS[rows or "single", a == "fp32"], label, types, const,
                      dots=rows != "gather")


def _q4(dtype: str, dx: bool, nested: bool, blocksize: int, aligned: bool) -> dict:
    """The QUANT4 constexprs of a bitsandbytes 4-bit weight (compute dtype ``dtype``)."""
    return dict(QUANT4=True, Q4_DX=dx, Q4_DTYPE=TL_DTYPES[_TORCH[dtype]], Q4_BLOCKSIZE=blocksize,
                Q4_BLOCKSIZE2=256 if nested else 0, Q4_ALIGNED=aligned)


def _quant4_view(q4: dict, transposed: bool) -> Quant4:
    """The ``descriptors.Quant4`` type of a 4-bit weight (``_q4``), as W^T (``transposed``)
    or W."""
    nested = "*fp32" if q4["Q4_BLOCKSIZE2"] else None
    return Quant4("*u8", "*u8" if nested else "*fp32", "*fp32", nested, nested, nested,
                  "i32", "i32",
                  *(tl.constexpr(q4[n]) for n in ("Q4_DTYPE", "Q4_BLOCKSIZE", "Q4_BLOCKSIZE2",
                                                  "Q4_ALIGNED")), tl.constexpr(transposed))


def _mat(dtype: str, name: str, dims: str, unit_strides: tuple[str, ...]) -> Mat:
    """The ``Mat`` type of operand ``name`` (its strides ``stride_{name}{d}`` for the two
    dimension letters of ``dims``, unit ones specialized to 1)."""
    return Mat(f"*{dtype}", *(tl.constexpr(1) if f"stride_{name}{d}" in unit_strides else "i32"
                              for d in dims))


def _linear(ab: str, lb: str, bias: bool, dropout: bool, label: str,
            unit_strides: tuple[str, ...], scale_out: bool = False,
            scale_in: bool = False, precision: str = FULL_FP32,
            in_place: bool = False, quant4: dict | None = None,
            rows: str | None = None) -> AotVariant:
    """quant4: a 4-bit W's QUANT4 constexprs (``_q4``); rows: None (one adapter), "positions"
    (sorted multi-adapter rows) or "gather"."""
    l_type, lb_type = _mat("fp32", "l", "mr", unit_strides), _mat(lb, "lb", "rn", unit_strides)
    seed = "*i64" if dropout else None
    types = dict(a=_mat(ab, "a", "mk", unit_strides), b=_mat(ab, "b", "kn", unit_strides),
                 out=_mat(ab, "o", "mn", unit_strides), M="i32", N="i32", K="i32", R="i32",
                 M_BUCKET="i32", low=Term(l_type, lb_type, "fp32", seed, "fp32",
                                          tl.constexpr(16)),
                 **({"bias": f"*{ab}"} if bias else {}),
                 **({"g": "*fp32"} if scale_out or scale_in else {}))
    const = dict(HAS_LORA=True, DROPOUT=dropout, SCALE_OUT=scale_out, SCALE_IN=scale_in,
                 IN_PLACE=in_place, PRECISION=precision, MULTI=False, QUANT4=0, bias=None,
                 g=None)
    if quant4:  # b is the 4-bit weight, W^T (QUANT4 1) or W (2: the dx pass)
        types["b"] = _quant4_view(quant4, not quant4["Q4_DX"])
        const["QUANT4"] = 2 if quant4["Q4_DX"] else 1
        kernel = linear.Q4_KERNELS[linear.kind(_TORCH[ab], _TORCH[lb], dropout),
                                   quant4["Q4_ALIGNED"]]
    elif rows:
        row_types = (Rows("*i32", None, None, "i32", tl.constexpr(True)) if rows == "gather" else
                     Rows(None, "*i32", "*i32", "i32", tl.constexpr(False)))
        types["low"] = BankTerm(l_type, "i32", "i32", lb_type, row_types, "*i32", "*i32",
                                "*fp32" if dropout else None, seed, tl.constexpr(16))
        if scale_out or scale_in:  # DoRA's g from the bank's facts
            types["g"] = DoraBank(f"*{lb}", "i32", "*fp32", "i32", "*i8")
        const["MULTI"] = True
        path = "scale_in" if scale_in else "gather" if rows == "gather" else "sorted"
        kernel = linear.MULTI_KERNELS[path, ab == "fp32"]
    elif in_place:  # out holds a @ b already: a and b are not passed
        del types["a"], types["b"]
        const.update(a=None, b=None)
        kernel = linear.IN_PLACE_KERNEL
    else:
        kernel = linear.KERNELS[linear.kind(*(_TORCH[t] for t in (ab, lb)), dropout)]
    return AotVariant(kernel, f"{label} {precision}", types, const)


def _tma(ab: str, lb: str, label: str, b_nk: bool, bias: bool = False, dropout: bool = False,
         scale_out: bool = False, scale_in: bool = False, precision: str = FULL_FP32
         ) -> AotVariant:
    """The sm_90 TMA kernel; b_nk: b described as W ``[N, K]`` (the forward)."""
    # the forward reads lb = B^T ([r, N], unit stride along r), the dx pass lb = A
    unit = ("stride_lr", "stride_lbr" if b_nk else "stride_lbn")
    low = Term(_mat("fp32", "l", "mr", unit), _mat(lb, "lb", "rn", unit), "fp32",
               "*i64" if dropout else None, "fp32", tl.constexpr(16))
    types = dict(low=low, M="i32", N="i32", K="i32", R="i32", M_BUCKET="i32",
                 **({"bias": f"*{ab}"} if bias else {}),
                 **({"g": "*fp32"} if scale_out or scale_in else {}))
    const = dict(HAS_LORA=True, DROPOUT=dropout, SCALE_OUT=scale_out, SCALE_IN=scale_in,
                 B_NK=b_nk, PRECISION=precision, bias=None, g=None)

    def descriptors(config):
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        b_block = [bn, bk] if b_nk else [bk, bn]
        return {"a_desc": f"tensordesc<{ab}[{bm}, {bk}]>",
                "b_desc": f"tensordesc<{ab}[{b_block[0]}, {b_block[1]}]>",
                "out_desc": f"tensordesc<{ab}[{bm}, {bn // 2}]>"}

    kind = linear.kind(_TORCH[ab], _TORCH[lb], dropout or scale_in)
    return AotVariant(linear_tma.KERNELS[kind], f"{label} {precision}", types, const, only=90,
                      config_types=descriptors)


def _dy(dy: str, b: str, dora: bool, precision: str = FULL_FP32, multi: bool = False
        ) -> AotVariant:
    """multi: sorted multi-adapter rows, B and dB the packed ``[S, N]`` B^T (seen as ``[N,
    S]``: unit stride along N)."""
    unit = ("stride_dyn", "stride_tr", "stride_yn",
            *(("stride_bn", "stride_dbn") if multi else ("stride_br", "stride_dbr")))
    types = dict(dy=_mat(dy, "dy", "mn", unit), b=_mat(b, "b", "nr", unit),
                 t=_mat("fp32", "t", "mr", unit), ds="*fp32", db=_mat("fp32", "db", "nr", unit),
                 M="i32", N="i32", R="i32", M_BUCKET="i32", scale="fp32")
    const = dict(DORA=dora, BLOCK_R=16, PRECISION=precision)
    if dora:
        types.update(g="*fp32", y=_mat(dy, "y", "mn", unit), bias=f"*{dy}", dg="*fp32")
    else:
        const.update(g=None, y=None, bias=None, dg=None)
    if multi:
        types["segs"] = Segments("*i32", "*i32", "*i32", "*i32", "*fp32", "i32", tl.constexpr(64))
        if dora:
            types["g"] = DoraBank(f"*{b}", "i32", "*fp32", "i32", "*i8")
        const["MULTI"] = True
    label = f"{'sorted ' if multi else ''}dy={dy} B={b} dora={dora} {precision}"
    return AotVariant(backward.DY_KERNELS[multi, b == "fp32"], label, types, const)


def _da(x: str, dot, precision: str = FULL_FP32, multi: bool = False) -> AotVariant:
    """multi: sorted multi-adapter rows, dA the packed ``[S, K]`` gradient."""
    unit = ("stride_dsr", "stride_xk")
    types = dict(ds=_mat("fp32", "ds", "mr", unit), x=_mat(x, "x", "mk", unit), da="*fp32",
                 M="i32", K="i32", R="i32", M_BUCKET="i32", seed="*i64", dropout_p="fp32",
                 keep_scale="fp32")
    const = dict(DOT_DTYPE=dot, DROPOUT=True, BLOCK_R=16, PRECISION=precision)
    if multi:
        types.update(segs=_segments("sorted"), p="*fp32")
        const["MULTI"] = True
    label = f"{'sorted ' if multi else ''}x={x} dot={dot} {precision}"
    return AotVariant(backward.DA_KERNELS[multi, dot == tl.float32], label, types, const)


def _dora_norm(w: str, a: str, precision: str = FULL_FP32, quant4: dict | None = None
               ) -> AotVariant:
    """The row-norm pass over W (``quant4``: a 4-bit W's QUANT4 constexprs, w ignored)."""
    unit = ("stride_wk", "stride_ak")
    # a 4-bit W as the norm op passes it: no compute dtype (fp32), not transposed
    q4 = quant4 and _quant4_view(dict(quant4, Q4_DTYPE=tl.float32), False)
    types = dict(w=q4 if quant4 else _mat(w, "w", "nk", unit),
                 a=_mat(a, "a", "rk", unit), wa_ptr="*fp32", sq_ptr="*fp32", N="i32", K="i32",
                 R="i32")
    const = dict(QUANT4=bool(quant4), BLOCK_R=16, PRECISION=precision)
    if quant4:
        kernel = dora.Q4_KERNELS[a == "fp32", quant4["Q4_ALIGNED"]]
        label = (f"4-bit W {'nested ' if quant4['Q4_BLOCKSIZE2'] else ''}"
                 f"b{quant4['Q4_BLOCKSIZE']}{'' if quant4['Q4_ALIGNED'] else ' straddling'}")
    else:
        kernel, label = dora.KERNELS[a == "fp32"], f"W={w}"
    return AotVariant(kernel, f"{label} A={a} {precision}", types, const)


# unit strides of the fused linear: forward a = x, b = W^T, l = T, lb = B^T; dx: a = dy,
# b = W, l = dS, lb = A (multi-adapter rows too); the multi-adapter forward's lb is the
# packed B^T [S, N], unit stride along N
_FWD = ("stride_ak", "stride_bk", "stride_lr", "stride_lbr", "stride_on")
_DX = ("stride_ak", "stride_bn", "stride_lr", "stride_lbn", "stride_on")
_MULTI_FWD = ("stride_ak", "stride_bk", "stride_lr", "stride_lbn", "stride_on")


# Every kernel with fp32 adapters (PEFT's default dtype) over a 16-bit base, at FULL_FP32
_FP32_ADAPTERS = [
    _shrink("bf16", "fp32", True),
    _shrink("fp16", "fp32", False),
    _linear("bf16", "fp32", True, False, "forward bf16, fp32 adapter, bias", _FWD),
    _linear("bf16", "fp32", False, True, "dx bf16, fp32 adapter, dropout", _DX),
    _linear("bf16", "fp32", True, False, "DoRA forward, fp32 adapter", _FWD, scale_out=True),
    _linear("bf16", "fp32", False, False, "DoRA dx, fp32 adapter", _DX, scale_in=True),
    _dy("bf16", "fp32", False),
    _dy("bf16", "fp32", True),
    _da("bf16", tl.float32),
    _dora_norm("bf16", "fp32"),
    _shrink("bf16", "fp32", True, rows="sorted"),
    _shrink("bf16", "fp32", True, rows="gather"),
    _linear("bf16", "fp32", True, False, "multi forward, fp32 adapter, bias", _MULTI_FWD,
            rows="positions"),
    _linear("bf16", "fp32", True, False, "multi DoRA forward, fp32 adapter", _MULTI_FWD,
            scale_out=True, rows="positions"),
    _linear("bf16", "fp32", True, False, "multi decode DoRA, fp32 adapter, gather", _MULTI_FWD,
            scale_out=True, rows="gather"),
    _linear("bf16", "fp32", False, True, "multi dx, fp32 adapter, dropout", _DX,
            rows="positions"),
    _linear("bf16", "fp32", False, False, "multi DoRA dx, fp32 adapter", _DX,
            scale_in=True, rows="positions"),
    _dy("bf16", "fp32", True, multi=True),
    _da("bf16", tl.float32, multi=True),
]


VARIANTS: list[AotVariant] = [
    # 16-bit adapters (precision does not apply to 16-bit dots)
    _shrink("fp16", "fp16", False, "tf32"),
    _linear("bf16", "bf16", True, False, "forward bf16, bf16 adapter, bias", _FWD, precision="tf32"),
    _linear("bf16", "bf16", False, True, "dx bf16, bf16 adapter, dropout", _DX, precision="tf32"),
    _dy("fp16", "fp16", False, "tf32"),
    _da("bf16", tl.bfloat16, "tf32"),
    _shrink("bf16", "bf16", False, "tf32", rows="sorted"),
    _shrink("bf16", "bf16", False, "tf32", rows="gather"),
    _linear("bf16", "bf16", True, False, "multi forward bf16, bias", _MULTI_FWD, precision="tf32",
            rows="positions"),
    _linear("bf16", "bf16", True, False, "multi decode bf16, bias, gather", _MULTI_FWD,
            precision="tf32", rows="gather"),
    _linear("bf16", "bf16", False, True, "multi dx bf16, dropout", _DX, precision="tf32",
            rows="positions"),
    _dy("bf16", "bf16", False, "tf32", multi=True),
    _da("bf16", tl.bfloat16, "tf32", multi=True),
    # a full-fp32 layer at the default precision
    _linear("fp32", "fp32", True, False, "forward fp32, fp32 adapter, bias", _FWD),
    _linear("fp32", "fp32", False, True, "dx fp32, fp32 adapter, dropout", _DX),
    _linear("fp32", "fp32", True, False, "multi DoRA forward fp32, bias", _MULTI_FWD,
            scale_out=True, rows="positions"),
    _linear("fp32", "fp32", False, False, "multi decode fp32, gather", _MULTI_FWD, rows="gather"),
    _linear("fp32", "fp32", False, False, "multi DoRA dx fp32", _DX, scale_in=True,
            rows="positions"),
    # fp32 adapters at torch's default "highest" precision
    *_FP32_ADAPTERS,
    # ... and at "high" (TF32), the kernels whose registers the precision changes most
    _shrink("bf16", "fp32", True, "tf32"),
    _linear("bf16", "fp32", True, False, "forward bf16, fp32 adapter, bias", _FWD, precision="tf32"),
    _linear("bf16", "fp32", False, True, "dx bf16, fp32 adapter, dropout", _DX, precision="tf32"),
    _dy("bf16", "fp32", True, "tf32"),
    _da("bf16", tl.float32, "tf32"),
    _dora_norm("bf16", "fp32", "tf32"),
    _shrink("bf16", "fp32", True, "tf32", rows="sorted"),
    _linear("bf16", "fp32", True, False, "multi DoRA forward, fp32 adapter", _MULTI_FWD,
            scale_out=True, precision="tf32", rows="positions"),
    _dy("bf16", "fp32", True, "tf32", multi=True),
]

# Issue 14's alternatives to the fused linear: the pass that adds the low-rank term, g and
# the bias into cuBLAS's output (IN_PLACE), and the sm_90 persistent TMA kernel (forward:
# b described as W [N, K]; dx: b = W as [K_dx, N_dx]) in every form the ops launch.
VARIANTS += [
    _linear("bf16", "fp32", True, False, "in place forward, fp32 adapter, bias", _FWD,
            in_place=True),
    _linear("bf16", "bf16", False, True, "in place dx bf16, bf16 adapter, dropout", _DX,
            precision="tf32", in_place=True),
    _linear("fp32", "fp32", False, True, "in place dx fp32, dropout", _DX, in_place=True),
    _tma("bf16", "fp32", "TMA forward bf16, fp32 adapter, bias", True, bias=True),
    _tma("bf16", "fp32", "TMA dx bf16, fp32 adapter, dropout", False, dropout=True),
    _tma("bf16", "fp32", "TMA DoRA forward, fp32 adapter", True, bias=True, scale_out=True),
    _tma("bf16", "fp32", "TMA DoRA dx, fp32 adapter", False, scale_in=True),
    _tma("fp16", "fp16", "TMA forward fp16, fp16 adapter", True, precision="tf32"),
    _tma("bf16", "bf16", "TMA dx bf16, bf16 adapter, dropout", False, dropout=True,
         precision="tf32"),
    _tma("fp32", "fp32", "TMA forward fp32, bias", True, bias=True),
    _tma("bf16", "fp32", "TMA forward bf16, fp32 adapter, bias", True, bias=True,
         precision="tf32"),
]


# bitsandbytes 4-bit base weights (QUANT4): QLoRA's NF4 with nested absmax (bf16 compute,
# fp32 adapters as PEFT's default, at both precisions), forward (W^T tiles, with the decode
# configs) and dx (W tiles), DoRA's forms and norm, and a plain absmax whose blocks straddle
# rows (odd K)
_Q4_NF4 = dict(nested=True, blocksize=64, aligned=True)
_Q4_ODD = dict(nested=False, blocksize=128, aligned=False)
VARIANTS += [
    _linear("bf16", "fp32", True, False, "4-bit forward bf16, fp32 adapter, bias", _FWD,
            quant4=_q4("bf16", False, **_Q4_NF4)),
    _linear("bf16", "fp32", False, True, "4-bit dx bf16, fp32 adapter, dropout", _DX,
            quant4=_q4("bf16", True, **_Q4_NF4)),
    _linear("bf16", "fp32", True, False, "4-bit forward bf16, fp32 adapter, bias", _FWD,
            precision="tf32", quant4=_q4("bf16", False, **_Q4_NF4)),
    _linear("bf16", "fp32", False, True, "4-bit dx bf16, fp32 adapter, dropout", _DX,
            precision="tf32", quant4=_q4("bf16", True, **_Q4_NF4)),
    _linear("bf16", "bf16", True, False, "4-bit forward bf16, bf16 adapter", _FWD,
            precision="tf32", quant4=_q4("bf16", False, **_Q4_NF4)),
    _linear("bf16", "fp32", True, False, "4-bit DoRA forward, fp32 adapter", _FWD,
            scale_out=True, quant4=_q4("bf16", False, **_Q4_NF4)),
    _linear("bf16", "fp32", False, False, "4-bit DoRA dx, fp32 adapter", _DX, scale_in=True,
            quant4=_q4("bf16", True, **_Q4_NF4)),
    _linear("fp16", "fp16", True, False, "4-bit forward fp16, b128 straddling", _FWD,
            precision="tf32", quant4=_q4("fp16", False, **_Q4_ODD)),
    _linear("fp16", "fp16", False, False, "4-bit dx fp16, b128 straddling", _DX,
            precision="tf32", quant4=_q4("fp16", True, **_Q4_ODD)),
    _dora_norm("bf16", "fp32", quant4=_q4("bf16", False, **_Q4_NF4)),
    _dora_norm("bf16", "fp32", "tf32", quant4=_q4("bf16", False, **_Q4_NF4)),
    _dora_norm("fp16", "fp16", "tf32", quant4=_q4("fp16", False, **_Q4_ODD)),
]
