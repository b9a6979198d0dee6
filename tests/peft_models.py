"""Tiny PEFT models built from configs for the tests of ``fastlora.patch``: hidden 32, one or
two layers, vocab 64, batch x seq = 2 x 6 (without a GPU the Triton kernels run in the CPU
interpreter). Every LoRA layer is created with ``init_lora_weights=False`` so lora_B is not
zero (a zero B hides wrong A gradients). Needs PEFT and transformers (test modules skip
first, then import this)."""
from __future__ import annotations

import copy
import sys

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn

import fastlora.peft  # noqa: F401 (PATCH_MODULE)
from helpers import MODEL_TOL, assert_close

# The module holding the patched forward (its calls to the fused ops are spied on).
PATCH_MODULE = sys.modules["fastlora.peft.forward"]

VOCAB = 64
BATCH, SEQ = 2, 6


def tiny_model(arch: str, layers: int = 1, dtype=torch.float32):
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                          max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=VOCAB, n_positions=64,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    elif arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                          max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # HF zero-inits biases: make them matter (Qwen2 q/k/v, Conv1D)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype)


def lora_config(arch: str = "llama", **kw) -> LoraConfig:
    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                init_lora_weights=False, fan_in_fan_out=(arch == "gpt2"))
    base.update(kw)
    return LoraConfig(**base)


def peft_pair(arch: str = "llama", layers: int = 1, dtype=torch.float32, device="cpu",
              config: LoraConfig | None = None, **kw):
    """(a PEFT model, an identical copy): patch the first, keep the second as the oracle."""
    model = get_peft_model(tiny_model(arch, layers, dtype), config or lora_config(arch, **kw))
    model = model.to(device)
    return model, copy.deepcopy(model)


def lora_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def ids(device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=g).to(device)


def add_adapter(models, name: str, config: LoraConfig) -> None:
    """The same new adapter (same random init) in each model."""
    for m in models:
        torch.manual_seed(7)
        m.add_adapter(name, config)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def assert_grads_close(patched, ref, tol=MODEL_TOL):
    gp, gr = lora_grads(patched), lora_grads(ref)
    assert gp.keys() == gr.keys() and gp
    for n in gr:
        assert gr[n] is not None and gp[n] is not None, n
        assert gr[n].abs().max() > 0, f"{n}: zero reference gradient (weak test)"
        assert_close(gp[n], gr[n], what=n, tol=tol)


def two_adapter_layer(device, dora: bool = False, alpha_b: int = 6):
    """A PEFT model on one Linear(32 -> 40) with adapters "default" (r=4, DoRA if ``dora``) and
    "b" (r=2, lora_alpha ``alpha_b``), patched, and an unpatched copy (the oracle)."""
    from fastlora import patch
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(32, 40)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                      init_lora_weights=False, use_dora=dora))
    torch.manual_seed(1)
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=alpha_b, target_modules=["0"],
                                      init_lora_weights=False))
    model = model.to(device).eval()
    ref = copy.deepcopy(model)
    assert patch(model).all_patched
    return model, ref
