"""Argument checks of the public ops that used to let bad input through or raise errors
that did not name the argument: a DoRA ``weight_norm`` of the wrong shape, dtype or values,
non-finite or float32-overflowing scales, a wrong ``dropout_p`` / ``seed`` / ``generator`` /
``training`` type, a rank-0 adapter."""
import math

import pytest
import torch

import fastlora
from data import generator, randn
from fastlora.adapters.packed import pack_adapters
from op_cases import make


def dora_args(device):
    x, w, b, a, bb = make(9, 24, 16, 4, torch.float32, device=device)
    m = randn(16, g=generator(110), device=device).abs() + 0.5
    return x, w, b, a, bb, m


@pytest.mark.parametrize("norm, error, match", [
    (lambda n: n[:-1], ValueError, r"weight_norm must have shape \(16,\) .*got \(15,\)"),
    (lambda n: n[:, None], ValueError, r"weight_norm must have shape \(16,\) .*got \(16, 1\)"),
    (lambda n: n.long(), TypeError, r"weight_norm has dtype torch.int64"),
    (lambda n: n.tolist(), TypeError, r"weight_norm must be a torch.Tensor, got list"),
    (lambda n: n.to("meta"), ValueError, r"different devices"),
])
def test_dora_weight_norm_argument_is_checked(norm, error, match, device):
    x, w, b, a, bb, m = dora_args(device)
    good = fastlora.dora_weight_norm(w, a, bb, 0.5)
    with pytest.raises(error, match=match):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m, weight_norm=norm(good))
    assert torch.equal(fastlora.dora_linear(x, w, b, a, bb, 0.5, m, weight_norm=good),
                       fastlora.dora_linear(x, w, b, a, bb, 0.5, m))


@pytest.mark.parametrize("value", [math.nan, 0.0, -1.0, math.inf])
def test_dora_weight_norm_values_on_the_host(value):
    """A CPU norm's values are read on the host (a CUDA norm's are not: no device sync)."""
    x, w, b, a, bb, m = dora_args("cpu")
    norm = fastlora.dora_weight_norm(w, a, bb, 0.5)
    norm[3] = value
    with pytest.raises(ValueError, match=rf"weight_norm\[3\] is {value}: .* finite and positive"):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m, weight_norm=norm)


@pytest.mark.parametrize("scaling", [math.nan, math.inf, -math.inf, 1e39, -1e300])
def test_non_finite_or_float32_overflowing_scales_are_refused(scaling, device):
    x, w, b, a, bb, m = dora_args(device)
    match = r"scaling must be finite and within float32's range .*got " + str(scaling).replace("+", r"\+")
    with pytest.raises(ValueError, match=match):
        fastlora.lora_linear(x, w, b, a, bb, scaling)
    with pytest.raises(ValueError, match=match):
        fastlora.dora_linear(x, w, b, a, bb, scaling, m)
    with pytest.raises(ValueError, match=match):
        fastlora.dora_weight_norm(w, a, bb, scaling)
    y = fastlora.lora_linear(x, w, b, a, bb, 1e30)  # large scales within float32 still run
    assert y.shape == (9, 16)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout_p="0.1", training=True), TypeError, r"dropout_p must be a real number, got str"),
    (dict(dropout_p=None), TypeError, r"dropout_p must be a real number, got NoneType"),
    (dict(dropout_p=0.1, training=True, seed=1.5), TypeError, r"seed must be an int or None, got float"),
    (dict(dropout_p=0.1, training=True, seed="7"), TypeError, r"seed must be an int or None, got str"),
    (dict(dropout_p=0.1, training=True, generator=3), TypeError,
     r"generator must be a torch.Generator or None, got int"),
    (dict(dropout_p=0.1, training="yes"), TypeError, r"training must be a bool, got str"),
])
def test_random_and_dropout_arguments_are_named(kwargs, error, match, device):
    x, w, b, a, bb, m = dora_args(device)
    with pytest.raises(error, match=match):
        fastlora.lora_linear(x, w, b, a, bb, 0.5, **kwargs)
    with pytest.raises(error, match=match):
        fastlora.dora_linear(x, w, b, a, bb, 0.5, m, **kwargs)
    if "dropout_p" not in match:  # multi_lora_linear takes dropout per adapter, in the bank
        kw = {k: v for k, v in kwargs.items() if k != "dropout_p"}
        bank = pack_adapters([(a, bb, 0.5)])
        with pytest.raises(error, match=match):
            fastlora.multi_lora_linear(x, w, b, bank, torch.zeros(9, dtype=torch.long, device=device), **kw)


def test_a_rank_zero_adapter_names_its_factors(device):
    x, w, b, a, bb = make(9, 24, 16, 4, torch.float32, device=device)
    with pytest.raises(ValueError, match=r"lora_A \(0, 24\) and lora_B \(16, 0\) have rank 0"):
        fastlora.lora_linear(x, w, b, a[:0], bb[:, :0], 0.5)


def test_pack_adapters_checks_scales_and_norms(device):
    _, w, _, a, bb, m = dora_args(device)
    with pytest.raises(ValueError, match=r"pack_adapters: adapter 1's scale must be finite .*got nan"):
        pack_adapters([(a, bb, 0.5), (a, bb, math.nan)])
    norm = fastlora.dora_weight_norm(w, a, bb, 0.5)
    with pytest.raises(ValueError, match=r"pack_adapters: weight_norms\[0\] must have shape \(16,\)"):
        pack_adapters([(a, bb, 0.5, m)], weight_norms=[norm[:-1]])
    if device == "cpu":
        norm[2] = 0.0
        with pytest.raises(ValueError, match=r"pack_adapters: weight_norms\[0\]\[2\] is 0.0"):
            pack_adapters([(a, bb, 0.5, m)], weight_norms=[norm])
