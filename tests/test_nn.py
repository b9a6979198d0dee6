"""fastlora.nn.LoraLinear against the reference op and nn.Linear (seeded data, tests/data.py)."""
import pytest
import torch
from torch import nn

import fastlora
from data import generator, randn
from fastlora import reference
from fastlora.nn import LoraLinear
from helpers import assert_close
from op_cases import compare, upstream
from tolerances import term_magnitudes


def seeded_base(device, seed) -> nn.Linear:
    g = generator(seed)
    base = nn.Linear(70, 48, device=device)
    with torch.no_grad():
        base.weight.copy_(randn(48, 70, g=g, device=device, scale=70 ** -0.5))
        base.bias.copy_(randn(48, g=g, device=device))
    return base


def lora_layer(device, seed, trained=True, **kw) -> LoraLinear:
    """A LoraLinear over a seeded base with seeded lora_A (and, ``trained``, a non-zero
    lora_B, as after some training)."""
    g = generator(1000 + seed)
    layer = LoraLinear.from_linear(seeded_base(device, seed), r=8, **kw)
    with torch.no_grad():
        layer.lora_A.copy_(randn(8, 70, g=g, device=device, scale=70 ** -0.5))
        if trained:
            layer.lora_B.copy_(randn(48, 8, g=g, device=device, scale=8 ** -0.5))
    return layer


def test_readme_import_path():
    """``import fastlora; fastlora.nn.LoraLinear(...)`` (README's first example)."""
    assert fastlora.nn.LoraLinear is LoraLinear
    assert fastlora.nn.DoraLinear.__module__ == "fastlora.nn.dora_linear"


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_reference(use_rslora, device):
    layer = lora_layer(device, 0, lora_alpha=16, use_rslora=use_rslora)
    assert layer.scaling == pytest.approx(16 / (8 ** 0.5 if use_rslora else 8))
    x = randn(2, 5, 70, g=generator(1), device=device, requires_grad=True)
    y = layer(x)
    dy = upstream(y, 0)
    y.backward(dy)
    compare(lambda *t: reference.lora_linear(*t, layer.scaling),
            [x, layer.weight, layer.bias, layer.lora_A, layer.lora_B], y, dy, torch.float32)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_new_layer_equals_base_and_from_linear_shares_weights(device):
    base = seeded_base(device, 2)
    layer = LoraLinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.dtype == torch.float32
    x = randn(7, 70, g=generator(3), device=device)
    terms = term_magnitudes(torch.nn.functional.linear, [x, base.weight, base.bias])[0]
    assert_close(layer(x), base(x).double(), torch.float32, "fresh adapter", terms)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_merge_unmerge_round_trip(device):
    layer = lora_layer(device, 4, lora_alpha=4).eval()
    x = randn(9, 70, g=generator(5), device=device)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_close(layer(x), before.double(), torch.float32, "merged")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(layer.weight, w0.double(), torch.float32, "unmerged weight")
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training(device):
    layer = lora_layer(device, 6, lora_alpha=8, lora_dropout=0.5)
    x = randn(9, 70, g=generator(7), device=device)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    no_drop = layer(x)
    layer.train()
    assert not torch.allclose(layer(x), no_drop)


def test_bad_arguments(device):
    with pytest.raises(ValueError, match="rank"):
        LoraLinear(8, 8, r=0, lora_alpha=1)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(8, 8, r=2, lora_alpha=1, lora_dropout=1.5)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoraLinear.from_linear(nn.Conv1d(2, 2, 1), r=2, lora_alpha=1)
