"""Kernel arguments as typed descriptors (``kernels/descriptors.py``): every kernel takes at
most 24 parameters, an absent feature is a None member (no placeholder pointer), and the
ahead-of-time signatures declare descriptors member by member."""
import importlib
import pkgutil

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import fastlora.kernels
from fastlora.kernels import aot, backward, linear, linear_tma, shrink
from fastlora.kernels.descriptors import (BankTerm, DoraBank, Mat, Quant4, Rows, Segments, Term,
                                          term)

MAX_PARAMS = 24


def _kernels():
    """Every ``@triton.jit`` kernel (a function named ``..._kernel``) in fastlora.kernels (an
    ``InterpretedFunction`` under TRITON_INTERPRET=1)."""
    found = {}
    for info in pkgutil.iter_modules(fastlora.kernels.__path__):
        module = importlib.import_module(f"fastlora.kernels.{info.name}")
        for name, value in vars(module).items():
            if (isinstance(value, (JITFunction, InterpretedFunction))
                    and name.endswith("_kernel")):
                found[name] = value
    return sorted(found.values(), key=lambda k: k.__name__)


KERNELS = _kernels()


def test_kernels_are_found():
    names = {k.__name__ for k in KERNELS}
    assert {"_lora_linear_kernel", "_lora_dy_kernel", "_lora_da_kernel", "_lora_shrink_kernel",
            "_lora_linear_tma_kernel"} <= names, names


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_kernels_take_at_most_24_parameters(kernel):
    assert len(kernel.arg_names) <= MAX_PARAMS, kernel.arg_names


def _variant(label):
    [variant] = [v for v in aot.VARIANTS if v.label == label]
    return variant


def test_aot_signature_declares_descriptors_by_member():
    variant = _variant("multi decode fp32, gather tf32x3")
    config = variant.kernel.configs[0].kwargs
    signature, constexprs, attrs = variant.compile_args(config)
    names = linear._lora_linear_kernel.arg_names
    low, a = names.index("low"), names.index("a")
    assert isinstance(signature["low"], BankTerm) and isinstance(signature["low"].rows, Rows)
    assert isinstance(signature["a"], Mat) and signature["a"].ptr == "*fp32"
    # no dropout: p and seed are None constexprs, not placeholder pointers
    assert signature["low"].p == signature["low"].seed == "constexpr"
    assert constexprs[(low, BankTerm._fields.index("p"))] is None
    assert constexprs[(low, BankTerm._fields.index("seed"))] is None
    # gathered rows: the index is a pointer, perm and keys absent, GATHER a constexpr member
    rows = (low, BankTerm._fields.index("rows"))
    assert signature["low"].rows.index == "*i32"
    assert constexprs[(*rows, Rows._fields.index("perm"))] is None
    assert constexprs[(*rows, Rows._fields.index("GATHER"))] is True
    # a's unit stride is specialized, its pointer and other stride aligned
    assert constexprs[(a, 2)] == 1
    assert (a, 0) in attrs and (a, 1) in attrs
    # no bias: None, no DoRA: g None
    assert constexprs[(names.index("bias"),)] is None
    assert constexprs[(names.index("g"),)] is None


def test_single_adapter_term_without_dropout_has_no_seed():
    signature, constexprs, _ = _variant(
        "forward bf16, fp32 adapter, bias tf32x3").compile_args(
        linear.KERNELS["heavy"].configs[0].kwargs)  # the variant's kernel
    low = linear._lora_linear_kernel.arg_names.index("low")
    assert isinstance(signature["low"], Term) and signature["low"].seed == "constexpr"
    assert constexprs[(low, Term._fields.index("seed"))] is None
    assert signature["bias"] == "*bf16"


def test_dy_signature_without_dora_has_no_dora_arguments():
    variant = _variant("sorted dy=bf16 B=bf16 dora=False tf32")
    signature, constexprs, attrs = variant.compile_args(variant.kernel.configs[0].kwargs)
    names = backward._lora_dy_kernel.arg_names
    for absent in ("g", "y", "bias", "dg"):  # None constexprs, not placeholder pointers
        assert signature[absent] == "constexpr" and constexprs[(names.index(absent),)] is None
    segs = names.index("segs")
    assert isinstance(signature["segs"], Segments) and signature["segs"].perm == "*i32"
    assert constexprs[(segs, Segments._fields.index("N_POW2"))] == 64
    # the packed B^T seen as [N, S]: unit stride along N
    assert constexprs[(names.index("b"), 1)] == 1 and (names.index("b"), 2) in attrs


def test_dy_signature_of_a_dora_bank():
    variant = _variant("sorted dy=bf16 B=fp32 dora=True tf32x3")
    signature, _, _ = variant.compile_args(variant.kernel.configs[0].kwargs)
    assert isinstance(signature["g"], DoraBank) and signature["g"].magnitude == "*fp32"
    assert isinstance(signature["y"], Mat) and signature["bias"] == "*bf16"


def test_gathered_shrink_signature_reads_rows_and_the_banks_facts():
    variant = _variant("gather x=bf16 A=fp32 dropout=True tf32x3")
    signature, constexprs, attrs = variant.compile_args(variant.kernel.configs[0].kwargs)
    names = shrink._lora_shrink_kernel.arg_names
    segs, rows = names.index("segs"), names.index("gathered")
    # gathered rows: no sorted perm/seg (None constexprs), the bank's facts as pointers
    assert isinstance(signature["segs"], Segments) and signature["segs"].ranks == "*i32"
    assert constexprs[(segs, Segments._fields.index("perm"))] is None
    assert constexprs[(segs, Segments._fields.index("seg"))] is None
    assert isinstance(signature["gathered"], Rows) and signature["gathered"].index == "*i32"
    assert constexprs[(rows, Rows._fields.index("GATHER"))] is True
    assert signature["p"] == "*fp32" and signature["seed"] == "*i64"
    # x, A and T as Mats, unit strides along K and R specialized
    assert isinstance(signature["t"], Mat) and constexprs[(names.index("t"), 2)] == 1
    assert constexprs[(names.index("x"), 2)] == 1 and (names.index("x"), 1) in attrs


def test_single_shrink_without_dropout_has_no_seed():
    variant = _variant("x=fp16 A=fp16 dropout=False tf32")
    signature, constexprs, _ = variant.compile_args(variant.kernel.configs[0].kwargs)
    names = shrink._lora_shrink_kernel.arg_names
    for absent in ("seed", "segs", "gathered", "p"):
        assert signature[absent] == "constexpr" and constexprs[(names.index(absent),)] is None


def test_tma_signature_takes_a_term_and_none_for_absent_bias_and_g():
    variant = _variant("TMA dx bf16, fp32 adapter, dropout tf32x3")
    config = variant.kernel.configs[0].kwargs
    signature, constexprs, _ = variant.compile_args(config)
    names = linear_tma._lora_linear_tma_kernel.arg_names
    assert isinstance(signature["low"], Term) and signature["low"].seed == "*i64"
    assert signature["a_desc"].startswith("tensordesc<bf16")
    for absent in ("bias", "g"):
        assert constexprs[(names.index(absent),)] is None


def test_da_signature_reads_segments():
    variant = _variant("sorted x=bf16 dot=bf16 tf32")
    signature, constexprs, _ = variant.compile_args(variant.kernel.configs[0].kwargs)
    names = backward._lora_da_kernel.arg_names
    assert isinstance(signature["segs"], Segments) and signature["segs"].perm == "*i32"
    assert isinstance(signature["ds"], Mat) and signature["da"] == "*fp32"
    assert constexprs[(names.index("ds"), 2)] == 1


def test_4bit_signature_declares_the_weight_by_member():
    variant = _variant("4-bit dx bf16, fp32 adapter, dropout tf32x3")
    signature, constexprs, _ = variant.compile_args(variant.kernel.configs[0].kwargs)
    b = linear._lora_linear_kernel.arg_names.index("b")
    q = signature["b"]
    assert isinstance(q, Quant4) and q.data == "*u8" and q.absmax == "*u8"  # nested codes
    assert (q.N, q.K) == ("i32", "i32")
    assert constexprs[(b, Quant4._fields.index("TRANSPOSED"))] is False  # the dx pass reads W
    assert constexprs[(b, Quant4._fields.index("BLOCKSIZE2"))] == 256


def test_quant4_is_the_launchers_and_the_kernels_type():
    data = torch.zeros(24, dtype=torch.uint8)
    plain = Quant4.from_parts(data, [torch.ones(1), torch.ones(16)], [4, 12, 64, 256],
                              torch.bfloat16)
    assert plain.shape == (4, 12) and plain.dtype == torch.bfloat16 and not plain.ALIGNED.value
    assert plain.absmax2 is None and plain.BLOCKSIZE2.value == 0  # not nested: no placeholders
    assert plain.b_shape == (4, 12) and plain.t().b_shape == (12, 4)
    assert plain.t().t().TRANSPOSED.value is False and plain.t().data is data


def test_term_needs_a_seed_for_dropout():
    l, lb = torch.zeros(3, 4), torch.zeros(4, 5)
    assert term(l, lb, 2.0, 0.0, torch.zeros(1, dtype=torch.int64)).seed is None
    with pytest.raises(ValueError, match="seed"):
        term(l, lb, 2.0, 0.1)


def test_quant4_without_a_compute_dtype_dequantizes_to_fp32():
    """DoRA's norm op passes no compute dtype."""
    q = Quant4.from_parts(torch.zeros(8, dtype=torch.uint8), [torch.ones(1), torch.ones(16)],
                          [4, 4, 64, 256], None)
    assert q.dtype == torch.float32
