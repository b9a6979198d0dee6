"""The serving benchmark compares like with like: the attached model and PEFT's mixed batch
agree on the same adapters, and its memory-traffic bound counts what a decode step reads."""

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
from bench_serve import (RANK, TARGETS, build_peft, check_outputs, random_adapter,
                         traffic_bytes)
from common import Run


def test_attached_model_agrees_with_peft_and_the_bound_counts_the_step(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastlora.adapters.bank import AdapterBank
    from fastlora.serve import attach

    g = torch.Generator().manual_seed(90)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    base = LlamaForCausalLM(cfg).to(device).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(device) * p.shape[-1] ** -0.5)
    adapters = [random_adapter(base, i, device) for i in range(3)]
    bank = AdapterBank(base, capacity=3, max_rank=RANK, fixed=True)
    for i, adapter in enumerate(adapters):
        bank.load(f"a{i}", adapter)
    peft_model = build_peft(base, adapters)
    attach(base, bank)
    run = Run("test", dry_run=device == "cpu", budget_s=None)
    check = check_outputs(base, bank, peft_model, run)
    assert check["relative"] < 1e-4
    assert len(adapters[0]) == len(TARGETS)
    traffic = traffic_bytes(base, rows=4, context=10, present=adapters[:2])
    weights = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear)) * 4
    kv = 1 * 2 * 4 * 2 * 8 * 11 * 4  # layers, K and V, rows, kv heads, head dim, tokens, fp32
    lora = 2 * RANK * sum(k + n for n, k in (base.get_submodule(name).weight.shape
                                             for name in adapters[0])) * 4
    assert traffic == {"base": weights + kv, "adapted": weights + kv + lora}


class _Forward517:
    """transformers 5.17's forward: the cache is ``past_key_values`` (a ``cache=`` lands in
    ``**kwargs``, ignored)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        pass


class _Forward525:
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        pass


class _StaticLayer517:
    """5.17's static cache layer: a length tensor, no ``crop``."""

    def __init__(self, length):
        self.cumulative_length = torch.tensor(length)


def test_the_cache_goes_under_the_keyword_of_the_transformers_version():
    from fastlora.serve.kv import cache_keyword

    assert cache_keyword(_Forward517()) == "past_key_values"
    assert cache_keyword(_Forward525()) == "cache"


def test_rollback_without_crop_moves_the_static_layers_back():
    from types import SimpleNamespace

    from bench_serve import rollback

    cache = SimpleNamespace(layers=[_StaticLayer517(9), _StaticLayer517(9)])
    rollback(cache, 1)
    assert [int(layer.cumulative_length) for layer in cache.layers] == [8, 8]


def test_decode_steps_keep_the_static_cache_at_the_context_length(device):
    """Each step writes one column and rolls it back: the same position every step, with
    the installed transformers' cache keyword and rollback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_serve import Decode

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg).to(device).eval()
    run = Run("test", dry_run=device == "cpu", budget_s=None)
    decode = Decode(run, model, rows=3, context=5)
    assert decode.cache.get_seq_length() == 5  # the prompt went into the static cache
    step = decode.step(model)
    for _ in range(3):
        step()
        assert decode.cache.get_seq_length() == 5
