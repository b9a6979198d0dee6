"""Printing adapters and banks shows summaries, never tensor contents."""
from __future__ import annotations

import torch
from torch import nn

from fastlora.adapters.bank import AdapterBank
from fastlora.io import Adapter, AdapterLayer, load_adapter


def layer(rank, n=12, k=10, alpha=4.0, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    return AdapterLayer(torch.randn(rank, k, generator=g), torch.randn(n, rank, generator=g), alpha, **extra)


def test_adapter_prints_a_summary():
    adapter = Adapter({"model.layers.0.self_attn.q_proj": layer(4), "model.layers.0.mlp.down_proj": layer(2, seed=1),
                       "model.layers.1.self_attn.q_proj": layer(4, seed=2, magnitude=torch.ones(12))}, "peft")
    assert repr(adapter) == "Adapter(peft, 3 layers (lora), ranks 2/4, 232 parameters, float32)"
    text = str(adapter)
    assert "tensor(" not in text and "format:      peft" in text
    assert "base model:  Llama-style decoder" in text and "DoRA: yes" in text
    groups = sorted(line.split() for line in text.splitlines() if line.startswith("lora "))
    assert groups == [["lora", "2", "4", "2", "float32", "1"], ["lora", "4", "4", "1", "float32", "2"]]
    assert repr(adapter.layers["model.layers.1.self_attn.q_proj"]) == \
        "AdapterLayer(rank=4, alpha=4, scale=1, A=[4, 10], B=[12, 4], float32, DoRA)"


def test_lycoris_layer_repr():
    loha = load_adapter({"m.hada_w1_a": torch.ones(6, 2), "m.hada_w1_b": torch.ones(2, 5), "m.hada_w2_a": torch.ones(6, 2),
                         "m.hada_w2_b": torch.ones(2, 5), "m.alpha": torch.tensor(1.0)})
    assert repr(loha.layers["m"]) == "LohaLayer(rank=2, alpha=1, scale=0.5, shape=[6, 5], float32)"
    assert repr(loha) == "Adapter(lycoris, 1 layers (loha), ranks 2, 44 parameters, float32)"


def test_bank_reprs():
    model = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 10))
    bank = AdapterBank(model, capacity=4)
    bank.load("alice", Adapter({"0": layer(4)}, "peft"))
    bank.load("bob", Adapter({"0": layer(2, seed=3), "1": layer(3, n=10, k=12, seed=4)}, "peft"))
    text = repr(bank)
    assert text.startswith("AdapterBank(2 adapters ['alice', 'bob'] over 2 layers of a model, float32 on cpu, "
                           "4 slots, max_rank=None, ") and text.endswith("KiB)")
    assert repr(bank["0"]) == "LayerBank(weight [12, 10], 2 adapters (rank by slot: {0: 4, 1: 2}), rows 6/16, " \
                              "slots 4, float32 on cpu)"
