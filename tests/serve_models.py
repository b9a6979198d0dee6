"""Builders shared by the server tests: a tiny Llama with seeded weights, seeded adapters
over some of its projections, and seeded prompts."""
from __future__ import annotations

import pytest
import torch

from data import generator, randint, randn

VOCAB = 48


def tiny_llama(device, seed: int, sharp_attention: bool = False):
    """A 2-layer Llama (hidden 32, vocab ``VOCAB``) in eval mode with weights from ``seed``;
    logits spread wide (no ties on rounding); ``sharp_attention``: q and k scaled up, so
    tokens follow the cache rather than the last token alone."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=VOCAB, max_position_embeddings=64,
                                      eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    g = generator(seed)
    qk = 3 if sharp_attention else 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 8 if "lm_head" in name else qk if name.endswith(("q_proj.weight",
                                                                     "k_proj.weight")) else 1
            p.copy_(randn(*p.shape, g=g, scale=scale * p.shape[-1] ** -0.5))
    return model.to(device)


def random_adapter(model, seed: int, rank: int, modules: tuple[str, ...], dora: bool = False):
    """``{layer: (A, B, scale 1.5, magnitude)}`` on the model's device for every layer whose
    name ends with one of ``modules``; DoRA: a magnitude near the weight's row norms."""
    g = generator(seed)
    layers = {}
    for name, m in model.named_modules():
        if name.endswith(modules):
            n, k = m.weight.shape
            A, B = randn(rank, k, g=g, scale=0.3), randn(n, rank, g=g, scale=0.3)
            magnitude = (m.weight.detach().cpu().norm(dim=1) * (1 + 0.3 * randn(n, g=g).abs())
                         if dora else None)
            dev = m.weight.device
            layers[name] = (A.to(dev), B.to(dev), 1.5,
                            None if magnitude is None else magnitude.to(dev))
    return layers


def random_prompts(seed: int, lengths) -> list[list[int]]:
    """Prompts of the given lengths, token ids below ``VOCAB``."""
    g = generator(seed)
    return [randint(0, VOCAB - 1, (n,), g=g).tolist() for n in lengths]


def decode_fails_once(server, requests) -> None:
    """Two steps of ``requests`` (submitted, not yet started), then a decode step whose
    forward raises in layer 1's MLP ("device lost") after layer 0 wrote its cache: the step
    re-raises and every request keeps its two tokens."""
    armed = []

    def fail_once(module, args):
        if armed:
            armed.pop()
            raise RuntimeError("device lost")

    hook = server.model.model.layers[1].mlp.register_forward_pre_hook(fail_once)
    try:
        server.step()
        server.step()
        armed.append(True)
        with pytest.raises(RuntimeError, match="device lost"):
            server.step()
    finally:
        hook.remove()
    assert server.running == requests and [len(r.tokens) for r in requests] == [2, 2]
