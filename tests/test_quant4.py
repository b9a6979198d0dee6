"""bitsandbytes 4-bit base weights: the ``Quant4Weight`` view and its checks, the kernels'
in-register dequantization (``dequant4_tile``, run tile by tile and inside the fused GEMM)
against bitsandbytes' own ``dequantize_4bit``, fastlora's PyTorch decode and the kernels'
against a decode by hand where bitsandbytes' CPU decode is wrong, and the 4-bit path of
``fastlora.reference``."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastlora
from data import generator, randn
from fastlora import reference
from fastlora.kernels import dequantize4, fused_linear
from fastlora.ops.quant4 import Quant4Weight, code_book, is_bnb_4bit
from helpers import assert_close

# (N, K), blocksize: blocks straddling rows (K not a multiple of the blocksize), odd N and K,
# an odd N * K (a padding nibble, rows starting on a low nibble), aligned rows
CASES = [((37, 70), 64), ((3, 37), 64), ((5, 130), 128), ((48, 128), 64), ((20, 256), 128),
         ((9, 96), 32)]
TILES = [(16, 16), (32, 64), (16, 128)]  # (block_n, block_k): tiles narrower and wider than a block


def case_id(case):
    (n, k), blocksize = case
    return f"{n}x{k}-b{blocksize}"


@pytest.fixture
def bnbf():
    return pytest.importorskip("bitsandbytes.functional")


def quantized(bnbf, shape, blocksize, quant_type, nested, device, seed=0, **kw):
    """bitsandbytes' packed data and QuantState of a seeded random weight, on ``device``."""
    w = randn(*shape, g=generator(seed))
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=nested, **kw)
    state.to(device)
    return packed.to(device), state


def bnb_dequantized(bnbf, packed, state, dtype):
    """The oracle: bitsandbytes' dequantize_4bit of the original state, rounded to dtype."""
    state = copy.copy(state)
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed, state)


def assert_same(got, want, dtype, device, what):
    """Bit-equal on CPU (both compute ``code * absmax`` in fp32, then round once); within the
    dtype's tolerance on GPU, where the compiler may fuse the nested absmax into an FMA."""
    if device == "cpu":
        assert torch.equal(got, want), f"{what}: max diff {(got.float() - want.float()).abs().max()}"
    else:
        assert_close(got, want, dtype, what)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tiles_dequantize_as_bitsandbytes(bnbf, case, quant_type, nested, device):
    shape, blocksize = case
    packed, state = quantized(bnbf, shape, blocksize, quant_type, nested, device)
    args = Quant4Weight.from_bnb(packed, state).kernel_args()
    want = bnb_dequantized(bnbf, packed, state, torch.float32)
    for transpose in (False, True):
        for block_n, block_k in TILES:
            got = dequantize4(args, torch.float32, transpose, block_n, block_k)
            assert_same(got, want, torch.float32, device,
                        f"transpose={transpose} tile {block_n}x{block_k}")
    got = dequantize4(args, torch.float16, True)
    assert_same(got, bnb_dequantized(bnbf, packed, state, torch.float16), torch.float16, device,
                "float16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_gemm_reads_packed_weight_both_ways(bnbf, case, quant_type, nested, dtype, device):
    """The fused GEMM alone: ``x @ W^T`` (the forward's tiles) and ``dy @ W`` (the dx
    pass's) on the packed weight, the dot in the compute dtype."""
    shape, blocksize = case
    n, k = shape
    packed, state = quantized(bnbf, shape, blocksize, quant_type, nested, device, seed=1)
    args = Quant4Weight.from_bnb(packed, state, compute_dtype=dtype).kernel_args()
    w = bnb_dequantized(bnbf, packed, state, dtype).double()
    g = generator(2)
    x = randn(37, k, g=g, device=device, dtype=dtype)
    dy = randn(37, n, g=g, device=device, dtype=dtype)
    y = fused_linear(x, args.t())
    dx = fused_linear(dy, args)
    assert y.dtype == dx.dtype == dtype
    assert_close(y, x.double() @ w.t(), dtype, "x @ W^T")
    assert_close(dx, dy.double() @ w, dtype, "dy @ W")


def test_code_books_are_bitsandbytes(bnbf):
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(code_book(quant_type, "cpu"), bnbf.get_4bit_type(quant_type, device="cpu"))
    with pytest.raises(ValueError, match="no 4-bit code book 'int4'"):
        code_book("int4", "cpu")


def test_view_of_params4bit_and_of_a_wider_quant_storage(bnbf, device):
    import bitsandbytes as bnb
    w = randn(24, 64, g=generator(3))
    param = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                              compress_statistics=True).to(device)
    assert is_bnb_4bit(param) and not is_bnb_4bit(w)
    view = Quant4Weight.from_bnb(param, compute_dtype=torch.float16)
    assert (view.shape, view.quant_type, view.blocksize, view.blocksize2) == ((24, 64), "nf4", 64, 256)
    assert view.nested and view.dtype == torch.float32 and view.compute_dtype == torch.float16
    assert view.data.data_ptr() == param.data_ptr()  # a view, not a copy
    assert_same(dequantize4(view.kernel_args()), bnbf.dequantize_4bit(param.data, param.quant_state),
                torch.float32, device, "Params4bit")
    # FSDP-style storage: the same bytes held as bfloat16
    packed, state = quantized(bnbf, (6, 64), 64, "fp4", False, device, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert_same(dequantize4(Quant4Weight.from_bnb(packed, state).kernel_args()),
                bnb_dequantized(bnbf, packed, state, torch.float32), torch.float32, device,
                "bfloat16 quant_storage")


def decoded_by_hand(bnbf, packed, state) -> torch.Tensor:
    """W ``[N, K]`` fp32 from the packed bytes, element by element (numpy fp32 arithmetic):
    flat element f is the high nibble of byte f // 2 (even f) or its low nibble (odd f), its
    value bitsandbytes' code book entry times the scale of block f // blocksize (nested: the
    uint8 absmax code through the second-level code book and absmax, plus the offset)."""
    n, k = state.shape
    data = packed.reshape(-1).view(torch.uint8).tolist()
    book = bnbf.get_4bit_type(state.quant_type, device="cpu").numpy()
    absmax = state.absmax.numpy()
    if state.nested:
        code2, absmax2, offset = state.state2.code.numpy(), state.state2.absmax.numpy(), state.offset.numpy()
        absmax = [code2[q] * absmax2[b // state.state2.blocksize] + offset.reshape(-1)[0]
                  for b, q in enumerate(absmax.tolist())]
    values = []
    for f in range(n * k):
        code = data[f // 2] >> 4 if f % 2 == 0 else data[f // 2] & 15
        values.append(book[code] * absmax[f // state.blocksize])
    return torch.tensor(np.array(values, dtype=np.float32)).view(n, k)


# blocks straddling rows with K a multiple of 16: where bitsandbytes 0.50's CPU decode is wrong
STRADDLING = [((5, 80), 64), ((4, 128), 256), ((3, 48), 64)]


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", STRADDLING, ids=case_id)
def test_pytorch_path_decodes_as_by_hand(bnbf, case, quant_type, nested, monkeypatch):
    """The PyTorch path (the CPU default) and the reference decode with fastlora's own decode,
    equal to a decode of the codes by hand; the kernels decode the same."""
    shape, blocksize = case
    packed, state = quantized(bnbf, shape, blocksize, quant_type, nested, "cpu", seed=4)
    view = Quant4Weight.from_bnb(packed, state, compute_dtype=torch.float32)
    want = decoded_by_hand(bnbf, packed, state)
    assert torch.equal(view.dequantize(), want)
    assert torch.equal(view.dequantize(torch.float16), want.half())
    assert torch.equal(reference.dequantize_4bit(view, torch.float32), want)
    assert torch.equal(dequantize4(view.kernel_args()), want)
    g = generator(5)
    x = randn(6, shape[1], g=g)
    lora_A, lora_B = randn(3, shape[1], g=g), randn(shape[0], 3, g=g)
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    got = fastlora.lora_linear(x, view, None, lora_A, lora_B, 0.5)
    torch.testing.assert_close(got, x @ want.T + 0.5 * (x @ lora_A.T) @ lora_B.T, rtol=1e-5, atol=1e-5)
    norm = fastlora.dora_weight_norm(view, lora_A, lora_B, 0.5)
    torch.testing.assert_close(norm, torch.linalg.norm(want + 0.5 * lora_B @ lora_A, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_reference_decodes_as_bitsandbytes(bnbf, nested, device):
    """Where bitsandbytes' decode is right (here K = 70 at blocksize 64), the same values."""
    packed, state = quantized(bnbf, (37, 70), 64, "nf4", nested, device)
    view = Quant4Weight.from_bnb(packed, state)
    for dtype in (torch.float32, torch.float16):
        assert_same(reference.dequantize_4bit(view, dtype), bnb_dequantized(bnbf, packed, state, dtype), dtype,
                    device, f"{dtype}")
    assert reference.dequantize_4bit(view).dtype == state.dtype


def test_reference_lora_and_dora_on_a_4bit_weight(bnbf, device):
    """The 4-bit reference is the dense reference on bitsandbytes' dequantized weight, and its
    base term is what bitsandbytes' own Linear4bit computes."""
    import bitsandbytes as bnb

    g = generator(4)
    n, k, r = 37, 70, 8
    dense = torch.nn.Linear(k, n)
    with torch.no_grad():
        dense.weight.copy_(randn(n, k, g=g, scale=k ** -0.5))
        dense.bias.copy_(randn(n, g=g))
    layer = bnb.nn.Linear4bit(k, n, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to(device)
    x = randn(2, 5, k, g=g, device=device, requires_grad=True)
    lora_A = randn(r, k, g=g, device=device, scale=k ** -0.5, requires_grad=True)
    lora_B = randn(n, r, g=g, device=device, scale=r ** -0.5, requires_grad=True)
    magnitude = randn(n, g=g, device=device).abs() + 0.5
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    base = reference.lora_linear(x, layer.weight, layer.bias, lora_A, lora_B * 0, 0.5)
    assert_close(base, layer(x), torch.float32, "base term vs bitsandbytes Linear4bit")
    for op, extra in ((reference.lora_linear, ()), (reference.dora_linear, (magnitude,))):
        got = op(x, layer.weight, layer.bias, lora_A, lora_B, 0.5, *extra)
        grads = torch.autograd.grad(got.square().sum(), (x, lora_A, lora_B))
        want = op(x, w, layer.bias, lora_A, lora_B, 0.5, *extra)
        assert torch.equal(got, want), op.__name__
        for a, b in zip(grads, torch.autograd.grad(want.square().sum(), (x, lora_A, lora_B))):
            assert torch.equal(a, b), op.__name__
    assert torch.equal(reference.dora_weight_norm(layer.weight, lora_A, lora_B, 0.5),
                       reference.dora_weight_norm(w, lora_A, lora_B, 0.5))


def _view(**changes) -> Quant4Weight:
    """A valid plain NF4 view of a [4, 64] weight (blocksize 64), with ``changes``."""
    fields = dict(data=torch.zeros(128, dtype=torch.uint8), absmax=torch.ones(4),
                  shape=(4, 64), quant_type="nf4", blocksize=64)
    return Quant4Weight(**{**fields, **changes})


NESTED = dict(absmax=torch.zeros(4, dtype=torch.uint8), absmax2=torch.ones(1),
              code2=torch.zeros(256), offset=torch.zeros(1))


@pytest.mark.parametrize("changes, error, match", [
    (dict(data=torch.zeros(127, dtype=torch.uint8)), ValueError,
     "packed data has 127 elements but .* needs 128: the quant state does not match"),
    (dict(shape=(4, 66)), ValueError, "packed data has 128 elements but .* needs 132"),
    (dict(absmax=torch.ones(3)), ValueError, "absmax has 3 elements but the blocks .* needs 4"),
    (dict(absmax=torch.ones(4, dtype=torch.float16)), TypeError, "absmax has dtype torch.float16"),
    (dict(data=torch.zeros(64, 2, dtype=torch.uint8)), ValueError, "contiguous 1-D"),
    (dict(blocksize=48), ValueError, "unsupported 4-bit blocksize 48"),
    (dict(quant_type="int4"), ValueError, "unsupported 4-bit quant type 'int4'"),
    (dict(shape=(256,)), ValueError, r"shape \[256\] is not a 2-D weight shape"),
    (dict(dtype=torch.int8), TypeError, "dtype torch.int8 is not float16"),
    (dict(compute_dtype=torch.float64), TypeError, "compute_dtype torch.float64"),
    ({**NESTED, "absmax": torch.ones(4)}, TypeError, "absmax has dtype torch.float32, expected torch.uint8"),
    ({**NESTED, "absmax2": torch.ones(2)}, ValueError, "nested absmax has 2 elements"),
    ({**NESTED, "blocksize2": 100}, ValueError, "unsupported nested blocksize 100"),
    (dict(absmax2=torch.ones(1)), ValueError, "absmax2, code2 and offset together"),
    (dict(absmax=torch.ones(4, device="meta")), ValueError, "parts are on different devices"),
])
def test_view_rejects_what_does_not_fit(changes, error, match):
    with pytest.raises(error, match=match):
        _view(**changes)


def test_view_checks_device_and_accepts_nested_parts():
    view = _view(**NESTED)
    assert view.nested and set(view.tensors()) == {"data", "absmax", "absmax2", "code2", "offset"}
    view.check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="the 4-bit weight is on cpu but x is on meta"):
        view.check_device(torch.device("meta"))


def test_from_bnb_rejects_foreign_states(bnbf):
    import bitsandbytes as bnb

    packed, state = quantized(bnbf, (8, 64), 64, "nf4", True, "cpu")
    other, _ = quantized(bnbf, (8, 96), 64, "nf4", True, "cpu")
    with pytest.raises(ValueError, match="packed data has 384 elements but .* needs 256"):
        Quant4Weight.from_bnb(other, state)
    with pytest.raises(ValueError, match="no quant_state"):
        Quant4Weight.from_bnb(bnb.nn.Params4bit(torch.zeros(8, 64), requires_grad=False))
    cpu_packed = copy.copy(state)
    cpu_packed.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        Quant4Weight.from_bnb(packed, cpu_packed)


def test_fastlora_imports_without_bitsandbytes():
    code = ("import sys, fastlora, fastlora.ops.quant4, fastlora.reference; "
            "assert 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
