"""Kernel arguments as typed descriptors (``kernels/descriptors.py``): the converted kernels
take at most 24 parameters, an absent feature is a None member (no placeholder pointer),
and the ahead-of-time signatures declare descriptors member by member."""
import pytest

from fastlora.kernels import aot, backward, linear
from fastlora.kernels.descriptors import BankTerm, DoraBank, Mat, Rows, Segments, Term

CONVERTED = [linear._lora_linear_kernel, backward._lora_dy_kernel]
MAX_PARAMS = 24


@pytest.mark.parametrize("kernel", CONVERTED, ids=lambda k: k.__name__)
def test_converted_kernels_take_at_most_24_parameters(kernel):
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
