"""What ``python -m fastlora check-kernels`` compiles: every kernel, in the dtype and flag
variants the launchers use, with every autotune config.

Signatures name each argument's Triton type. As Triton does at run time for contiguous
LLM-sized tensors, unit strides are specialized to 1 and pointers, other strides and the
N/K sizes are marked divisible by 16."""
from __future__ import annotations

from dataclasses import dataclass, field

import triton.language as tl

from . import backward, dora, linear, multi_backward, multi_linear, multi_shrink, shrink


@dataclass(frozen=True)
class AotVariant:
    """One compilation of ``kernel``: argument types, constexpr values, a label."""
    kernel: object  # the @triton.autotune-wrapped kernel
    label: str
    types: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    gemm: bool = True  # must use tensor cores

    def attrs(self) -> dict:
        names = self.kernel.fn.arg_names
        aligned = [n for n, t in self.types.items()
                   if t.startswith("*") or n.startswith("stride_") or n in ("N", "K")]
        return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


def _shrink(x: str, a: str, dropout: bool, precision: str = "tf32") -> AotVariant:
    types = dict(x_ptr=f"*{x}", a_ptr=f"*{a}", t_ptr="*fp32", M="i32", K="i32", R="i32",
                 M_BUCKET="i32", stride_xm="i32", stride_ar="i32", stride_tm="i32",
                 seed_ptr="*i64", dropout_p="fp32", keep_scale="fp32")
    const = dict(stride_xk=1, stride_ak=1, stride_tr=1, DROPOUT=dropout, BLOCK_R=16,
                 PRECISION=precision)
    # full-fp32 dots (torch's default matmul precision) run on FMA units, not tensor cores
    return AotVariant(shrink._lora_shrink_kernel, f"x={x} A={a} dropout={dropout} {precision}",
                      types, const, gemm=precision != "ieee")


def _linear(ab: str, lb: str, bias: bool, dropout: bool, label: str,
            unit_strides: tuple[str, ...], scale_out: bool = False,
            scale_in: bool = False) -> AotVariant:
    strides = ["stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_lm", "stride_lr",
               "stride_lbr", "stride_lbn", "stride_om", "stride_on"]
    types = dict(a_ptr=f"*{ab}", b_ptr=f"*{ab}", l_ptr="*fp32", lb_ptr=f"*{lb}", bias_ptr=f"*{ab}",
                 g_ptr="*fp32", out_ptr=f"*{ab}", M="i32", N="i32", K="i32", R="i32",
                 M_BUCKET="i32", scale="fp32", seed_ptr="*i64", dropout_p="fp32",
                 **{n: "i32" for n in strides if n not in unit_strides})
    const = dict(HAS_LORA=True, HAS_BIAS=bias, DROPOUT=dropout, SCALE_OUT=scale_out,
                 SCALE_IN=scale_in, BLOCK_R=16, PRECISION="tf32",
                 **{n: 1 for n in unit_strides})
    return AotVariant(linear._lora_linear_kernel, label, types, const)


def _dy(dy: str, b: str, dora: bool) -> AotVariant:
    types = dict(dy_ptr=f"*{dy}", b_ptr=f"*{b}", t_ptr="*fp32", ds_ptr="*fp32", db_ptr="*fp32",
                 g_ptr="*fp32", y_ptr=f"*{dy}", bias_ptr=f"*{dy}", dg_ptr="*fp32",
                 M="i32", N="i32", R="i32", M_BUCKET="i32", stride_dym="i32", stride_bn="i32",
                 stride_tm="i32", stride_ym="i32", scale="fp32")
    const = dict(stride_dyn=1, stride_br=1, stride_tr=1, stride_yn=1, DORA=dora, HAS_BIAS=dora,
                 BLOCK_R=16, PRECISION="tf32")
    return AotVariant(backward._lora_dy_kernel, f"dy={dy} B={b} dora={dora}", types, const)


def _da(x: str, dot) -> AotVariant:
    types = dict(ds_ptr="*fp32", x_ptr=f"*{x}", da_ptr="*fp32", M="i32", K="i32", R="i32",
                 M_BUCKET="i32", stride_dsm="i32", stride_xm="i32", seed_ptr="*i64",
                 dropout_p="fp32", keep_scale="fp32")
    const = dict(stride_dsr=1, stride_xk=1, DOT_DTYPE=dot, DROPOUT=True, BLOCK_R=16,
                 PRECISION="tf32")
    return AotVariant(backward._lora_da_kernel, f"x={x} dot={dot}", types, const)


def _dora_norm(w: str, a: str) -> AotVariant:
    types = dict(w_ptr=f"*{w}", a_ptr=f"*{a}", wa_ptr="*fp32", sq_ptr="*fp32", N="i32", K="i32",
                 R="i32", stride_wn="i32", stride_ar="i32")
    const = dict(stride_wk=1, stride_ak=1, BLOCK_R=16, PRECISION="tf32")
    return AotVariant(dora._dora_norm_kernel, f"W={w} A={a}", types, const)


_MULTI_META = dict(perm_ptr="*i32", seg_ptr="*i32", off_ptr="*i32", rank_ptr="*i32",
                   n_adapters="i32")


def _multi_shrink(x: str, a: str, dropout: bool) -> AotVariant:
    types = dict(x_ptr=f"*{x}", a_ptr=f"*{a}", s_ptr="*fp32", scale_ptr="*fp32", p_ptr="*fp32",
                 M="i32", K="i32", R="i32", M_BUCKET="i32", stride_xm="i32", stride_am="i32",
                 stride_sm="i32", seed_ptr="*i64", **_MULTI_META)
    const = dict(stride_xk=1, stride_ak=1, stride_sr=1, DROPOUT=dropout, BLOCK_R=16, N_POW2=64,
                 PRECISION="tf32")
    return AotVariant(multi_shrink._multi_shrink_kernel, f"x={x} A={a} dropout={dropout}", types,
                      const)


def _multi_linear(ab: str, lb: str, label: str, unit_strides: tuple[str, ...], bias: bool = False,
                  dropout: bool = False, scale_out: bool = False, scale_in: bool = False,
                  gather: bool = False) -> AotVariant:
    kernel = (multi_linear._tuned_scale_in if scale_in else
              multi_linear._tuned_gather if gather else multi_linear._tuned)
    strides = ["stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_lm", "stride_lr",
               "stride_lbr", "stride_lbn", "stride_gm", "stride_gn", "stride_om", "stride_on"]
    types = dict(a_ptr=f"*{ab}", b_ptr=f"*{ab}", l_ptr="*fp32", lb_ptr=f"*{lb}", bias_ptr=f"*{ab}",
                 g_ptr="*fp32", p_ptr="*fp32", out_ptr=f"*{ab}", perm_ptr="*i32", key_ptr="*i32",
                 off_ptr="*i32", rank_ptr="*i32", n_adapters="i32", M="i32", N="i32", K="i32",
                 R="i32", M_BUCKET="i32", seed_ptr="*i64",
                 **{n: "i32" for n in strides if n not in unit_strides})
    const = dict(HAS_BIAS=bias, DROPOUT=dropout, SCALE_OUT=scale_out, SCALE_IN=scale_in,
                 GATHER=gather, BLOCK_R=16, PRECISION="tf32", **{n: 1 for n in unit_strides})
    return AotVariant(kernel, label, types, const)


def _multi_dy(dy: str, b: str, dora: bool) -> AotVariant:
    types = dict(dy_ptr=f"*{dy}", b_ptr=f"*{b}", s_ptr="*fp32", ds_ptr="*fp32", db_ptr="*fp32",
                 g_ptr="*fp32", y_ptr=f"*{dy}", bias_ptr=f"*{dy}", dg_ptr="*fp32",
                 scale_ptr="*fp32", dora_ptr="*i8", M="i32", N="i32", R="i32", M_BUCKET="i32",
                 stride_dym="i32", stride_bm="i32", stride_sm="i32", stride_ym="i32",
                 **_MULTI_META)
    const = dict(stride_dyn=1, stride_bn=1, stride_sr=1, stride_yn=1, DORA=dora, HAS_BIAS=dora,
                 BLOCK_R=16, N_POW2=64, PRECISION="tf32")
    return AotVariant(multi_backward._multi_dy_kernel, f"dy={dy} B={b} dora={dora}", types, const)


def _multi_da(x: str, dot, dropout: bool) -> AotVariant:
    types = dict(ds_ptr="*fp32", x_ptr=f"*{x}", da_ptr="*fp32", p_ptr="*fp32", M="i32", K="i32",
                 R="i32", M_BUCKET="i32", stride_dsm="i32", stride_xm="i32", seed_ptr="*i64",
                 **_MULTI_META)
    const = dict(stride_dsr=1, stride_xk=1, DOT_DTYPE=dot, DROPOUT=dropout, BLOCK_R=16, N_POW2=64,
                 PRECISION="tf32")
    return AotVariant(multi_backward._multi_da_kernel, f"x={x} dot={dot} dropout={dropout}", types,
                      const)


VARIANTS: list[AotVariant] = [
    _shrink("bf16", "fp32", True),
    _shrink("fp16", "fp16", False),
    _shrink("bf16", "fp32", False, "ieee"),
    # forward: a = x, b = W^T, l = T, lb = B^T; dx: a = dy, b = W, l = dS, lb = A
    _linear("bf16", "fp32", True, False, "forward bf16, fp32 adapter, bias",
            ("stride_ak", "stride_bk", "stride_lr", "stride_lbr", "stride_on")),
    _linear("bf16", "bf16", False, True, "dx bf16, bf16 adapter, dropout",
            ("stride_ak", "stride_bn", "stride_lr", "stride_lbn", "stride_on")),
    _linear("bf16", "fp32", True, False, "DoRA forward, fp32 adapter",
            ("stride_ak", "stride_bk", "stride_lr", "stride_lbr", "stride_on"), scale_out=True),
    _linear("bf16", "fp32", False, False, "DoRA dx, fp32 adapter",
            ("stride_ak", "stride_bn", "stride_lr", "stride_lbn", "stride_on"), scale_in=True),
    _dy("bf16", "fp32", False),
    _dy("fp16", "fp16", False),
    _dy("bf16", "fp32", True),
    _dora_norm("bf16", "fp32"),
    _da("bf16", tl.float32),
    _da("bf16", tl.bfloat16),
    # multi-adapter: forward a = x, b = W^T, lb = packed B^T; dx: a = dy, b = W, lb = packed A
    _multi_shrink("bf16", "bf16", False),
    _multi_shrink("bf16", "fp32", True),
    _multi_linear("bf16", "bf16", "multi forward bf16, bias",
                  ("stride_ak", "stride_bk", "stride_lr", "stride_lbn", "stride_gn", "stride_on"),
                  bias=True),
    _multi_linear("bf16", "fp32", "multi DoRA forward, fp32 adapter",
                  ("stride_ak", "stride_bk", "stride_lr", "stride_lbn", "stride_gn", "stride_on"),
                  bias=True, scale_out=True),
    _multi_linear("bf16", "fp32", "multi decode DoRA, fp32 adapter, gather",
                  ("stride_ak", "stride_bk", "stride_lr", "stride_lbn", "stride_gn", "stride_on"),
                  bias=True, scale_out=True, gather=True),
    _multi_linear("bf16", "bf16", "multi dx bf16, dropout",
                  ("stride_ak", "stride_bn", "stride_lr", "stride_lbn", "stride_gn", "stride_on"),
                  dropout=True),
    _multi_linear("bf16", "fp32", "multi DoRA dx, fp32 adapter",
                  ("stride_ak", "stride_bn", "stride_lr", "stride_lbn", "stride_gn", "stride_on"),
                  scale_in=True),
    _multi_dy("bf16", "bf16", False),
    _multi_dy("bf16", "fp32", True),
    _multi_da("bf16", tl.bfloat16, True),
]
