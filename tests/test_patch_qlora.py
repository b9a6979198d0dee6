"""fastlora.patch on a QLoRA model: a tiny Llama saved, loaded with transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` on CPU (bitsandbytes' CPU backend), PEFT LoRA /
DoRA on its ``Linear4bit`` layers; patched against unpatched PEFT (logits, loss, every LoRA
gradient, ``generate``), and the layouts or layers that are not accelerated, with reasons.

bitsandbytes' CPU ``Linear4bit`` forward repacks its weight for AVX512-BF16 inference
(``packing_format_for_cpu``) the first time it runs in eval mode without grad: the reference
models turn that off (``support_avx512bf16_for_cpu``) so PEFT computes on the standard
layout; a layer repacked anyway is reported and left to PEFT.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

from fastlora.peft import patch  # noqa: E402
from helpers import assert_close  # noqa: E402
from peft_models import assert_grads_close, ids  # noqa: E402

VOCAB = 64


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny fp32 Llama on disk (K and N multiples of the blocksize, as real layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


def qlora(path, quant_type="nf4", nested=True, **lora):
    """The saved Llama loaded in 4-bit on CPU with a (seeded, non-zero) PEFT adapter."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                               bnb_4bit_use_double_quant=nested,
                               bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu",
                                             dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        **lora)
    return get_peft_model(model, config)


def spy_dora(monkeypatch) -> list:
    """Records the patched layers' calls to the fused DoRA op."""
    module = sys.modules["fastlora.peft.forward"]
    calls, real = [], module.dora_linear

    def spy(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(module, "dora_linear", spy)
    return calls


def no_cpu_repack(model):
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("quant_type, nested, dora", [("nf4", True, False), ("fp4", False, False),
                                                       ("nf4", True, True)],
                         ids=["nf4-nested", "fp4", "nf4-dora"])
def test_logits_loss_and_grads_match_peft(saved_llama, quant_type, nested, dora, fused_calls,
                                          monkeypatch):
    model = qlora(saved_llama, quant_type, nested, use_dora=dora).train()
    ref = qlora(saved_llama, quant_type, nested, use_dora=dora).train()
    report = patch(model)
    dora_calls = spy_dora(monkeypatch)
    assert report.all_patched and len(report.patched) == 7
    assert all(f"bitsandbytes 4-bit base ({quant_type.upper()}" in e.notes[0]
               for e in report.layers)
    x = ids("cpu")
    out, exp = model(x, labels=x), ref(x, labels=x)
    assert (len(fused_calls), len(dora_calls)) == ((0, 7) if dora else (7, 0))
    assert_close(out.logits, exp.logits, what="logits")
    assert_close(out.loss, exp.loss, what="loss")
    out.loss.backward()
    exp.loss.backward()
    assert_grads_close(model, ref)


def test_generate_same_tokens(saved_llama, fused_calls):
    model = qlora(saved_llama).eval()
    ref = no_cpu_repack(qlora(saved_llama).eval())
    patch(model)
    prompt = ids("cpu")[:1]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, min_new_tokens=3)
    assert torch.equal(model.generate(input_ids=prompt, **kw), ref.generate(input_ids=prompt, **kw))
    assert len(fused_calls) == 3 * 7


def test_cpu_repacked_weight_is_not_accelerated(saved_llama, fused_calls):
    """A Linear4bit that bitsandbytes repacked for CPU inference: reported at patch time, and
    a layer repacked after patching falls back to PEFT (never reads the other layout)."""
    model = qlora(saved_llama).eval()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = q_proj(x)  # PEFT's forward: bitsandbytes repacks q_proj's weight
    assert q_proj.base_layer.weight.quant_state.packing_format_for_cpu
    report = patch(model)
    assert report.not_patched == {
        "base_model.model.model.layers.0.self_attn.q_proj":
            "bitsandbytes 4-bit weight not accelerated: the 4-bit weight is in bitsandbytes' "
            "CPU inference packing (packing_format_for_cpu, set by an eval-mode Linear4bit "
            "forward on CPU), not the standard layout fastlora reads"}
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    with model.disable_adapter(), torch.no_grad():
        k_proj(x)  # PEFT's forward, the base layer alone: bitsandbytes repacks k_proj now
    assert k_proj.base_layer.weight.quant_state.packing_format_for_cpu
    with torch.no_grad():
        got = k_proj(x)
        peft_forward = type(k_proj)._fastlora_original_class.forward
        assert not fused_calls, "a repacked layer must run PEFT's forward"
        assert torch.equal(got, peft_forward(k_proj, x))
        assert torch.equal(want, q_proj(x))


def test_transposed_4bit_weight_is_left_to_peft(saved_llama, fused_calls):
    """A weight quantized from a [in, out] tensor (bitsandbytes' deprecated orientation, which
    it still computes with): reported, and the layer keeps PEFT's forward."""
    import bitsandbytes as bnb

    model = no_cpu_repack(qlora(saved_llama))
    up = model.base_model.model.model.layers[0].mlp.up_proj  # [128, 64]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) / 8
    up.base_layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to("cpu")
    report = patch(model)
    assert report.not_patched == {
        "base_model.model.model.layers.0.mlp.up_proj":
            "bitsandbytes 4-bit weight quantized as [64, 128], not [out_features, in_features] "
            "= [128, 64] (bitsandbytes' deprecated orientation)"}
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    assert not hasattr(type(up), "_fastlora_original_class")  # PEFT's own class
    with torch.no_grad():
        assert up(x).shape == (2, 128) and not fused_calls


def test_8bit_base_is_reported(tmp_path, saved_llama):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        saved_llama, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map="cpu", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    report = patch(model)
    assert list(report.not_patched.values()) == [
        "bitsandbytes 8-bit base (Linear8bitLt) is not accelerated: the fused kernels read "
        "16/32-bit and bitsandbytes 4-bit (NF4/FP4) weights"]


# ------------------------------------------------------------------ one 4-bit layer


class OneLayer(torch.nn.Module):
    def __init__(self, nested=True):
        import bitsandbytes as bnb

        super().__init__()
        torch.manual_seed(0)
        self.fc = bnb.nn.Linear4bit(48, 32, compute_dtype=torch.float32, quant_type="nf4",
                                    compress_statistics=nested)
        self.fc.support_avx512bf16_for_cpu = False
        self.to("cpu")  # bitsandbytes quantizes the weight on the move

    def forward(self, x):
        return self.fc(x)


def one_layer_qlora(**lora):
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], init_lora_weights=False, **lora)
    return get_peft_model(OneLayer(), config)


def tampered(state, change):
    """A copy of a nested quant state (its second level copied too) with ``change`` applied."""
    import copy

    state = copy.copy(state)
    state.state2 = copy.copy(state.state2)
    change(state)
    return state


# 48 x 32 = 1536 codes in 768 bytes, 24 blocks of 64, nested
TAMPERINGS = [
    (lambda s: setattr(s, "blocksize", 48), ValueError, "unsupported 4-bit blocksize 48"),
    (lambda s: setattr(s, "quant_type", "int4"), ValueError, "unsupported 4-bit quant type 'int4'"),
    (lambda s: setattr(s, "absmax", s.absmax[:-1]), ValueError, "4-bit absmax has 23 elements"),
    (lambda s: setattr(s, "absmax", s.absmax.float()), TypeError, "4-bit absmax has dtype torch.float32"),
    (lambda s: setattr(s, "shape", torch.Size([32, 50])), ValueError, "packed data has 768 elements"),
    (lambda s: setattr(s.state2, "code", s.state2.code[:128]), ValueError, "nested code has 128 elements"),
    (lambda s: setattr(s, "offset", torch.zeros(2)), ValueError, "nested offset has 2 elements"),
    (lambda s: setattr(s.state2, "blocksize", 100), ValueError, "unsupported nested blocksize 100"),
]


@pytest.mark.parametrize("change, error, match", TAMPERINGS,
                         ids=["blocksize", "quant_type", "absmax-short", "absmax-dtype", "shape",
                              "nested-code", "offset", "nested-blocksize"])
def test_tampered_quant_state_raises_the_check_error(change, error, match):
    """A quant state that fails fastlora's check is refused by ``lora_linear``, by ``patch``
    and by an already patched layer alike: never PEFT's forward on it (garbage)."""
    import fastlora

    model = one_layer_qlora()
    patch(model)
    fc = model.base_model.model.fc
    weight = fc.base_layer.weight
    weight.quant_state = tampered(weight.quant_state, change)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    lora_A, lora_B = fc.lora_A["default"].weight, fc.lora_B["default"].weight
    with pytest.raises(error, match=match):
        fastlora.lora_linear(x, weight, None, lora_A, lora_B, 2.0)
    with pytest.raises(error, match=match):
        model(x)
    fresh = one_layer_qlora()
    state = fresh.base_model.model.fc.base_layer.weight.quant_state
    fresh.base_model.model.fc.base_layer.weight.quant_state = tampered(state, change)
    with pytest.raises(error, match=match):
        patch(fresh)
    assert not hasattr(type(fresh.base_model.model.fc), "_fastlora_original_class")  # left as it was


class BitsandbytesOps(TorchDispatchMode):
    """Records the bitsandbytes ops run while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bitsandbytes":
            self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def test_dora_training_step_never_dequantizes_through_bitsandbytes(fast_backend):
    """DoRA over a 4-bit base in training, dropout 0: the forward, the row norm and the
    backward decode the packed weight with fastlora's own decode (PyTorch path) or in the
    kernels' registers, never with bitsandbytes' dequantize_4bit."""
    model = one_layer_qlora(use_dora=True, lora_dropout=0.0).train()
    assert patch(model).all_patched
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
    with BitsandbytesOps() as seen:
        model(x).square().mean().backward()
    assert not [op for op in seen.ops if "dequantize" in op], seen.ops
    fc = model.base_model.model.fc
    assert fc.lora_A["default"].weight.grad.abs().sum() > 0
    assert fc.lora_magnitude_vector["default"].weight.grad.abs().sum() > 0
