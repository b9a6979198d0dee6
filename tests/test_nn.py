"""fastlora.nn.LoraLinear against the reference op and nn.Linear."""
import pytest
import torch
from torch import nn

from fastlora import reference
from fastlora.nn import LoraLinear
from tolerances import assert_close


def trained(layer: LoraLinear) -> LoraLinear:
    with torch.no_grad():  # a non-zero B, as after some training
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_reference(use_rslora, device):
    torch.manual_seed(0)
    layer = trained(LoraLinear(70, 48, r=8, lora_alpha=16, use_rslora=use_rslora, device=device))
    assert layer.scaling == pytest.approx(16 / (8 ** 0.5 if use_rslora else 8))
    x = torch.randn(2, 5, 70, device=device)
    y = layer(x)
    y.square().sum().backward()
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    y_ref = reference.lora_linear(x.double(), layer.weight.double(), layer.bias.double(), A, B,
                                  layer.scaling)
    y_ref.square().sum().backward()
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(layer.lora_A.grad, A.grad, torch.float32, "grad lora_A")
    assert_close(layer.lora_B.grad, B.grad, torch.float32, "grad lora_B")
    assert layer.weight.grad is None and layer.bias.grad is None


def test_new_layer_equals_base_and_from_linear_shares_weights(device):
    base = nn.Linear(70, 48, device=device)
    layer = LoraLinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(7, 70, device=device)
    assert_close(layer(x), base(x).double(), torch.float32, "fresh adapter")
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_merge_unmerge_round_trip(device):
    torch.manual_seed(1)
    layer = trained(LoraLinear(70, 48, r=8, lora_alpha=4, device=device)).eval()
    x = torch.randn(9, 70, device=device)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_close(layer(x), before.double(), torch.float32, "merged")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.allclose(layer.weight, w0, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_only_in_training(device):
    torch.manual_seed(2)
    layer = trained(LoraLinear(70, 48, r=8, lora_alpha=8, lora_dropout=0.5, device=device))
    x = torch.randn(9, 70, device=device)
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
