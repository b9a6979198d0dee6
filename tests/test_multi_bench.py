"""The multi-adapter benchmark compares like with like: its implementations agree (CPU, tiny)."""

import pytest
import torch

from data import generator, randn

pytest.importorskip("peft")
from bench_multi import assign, make_impls, make_layer


@pytest.mark.parametrize("kind", ["uniform", "skewed", "distinct"])
def test_benchmarked_implementations_agree(kind, device):
    layer, bank = make_layer(64, 48, [8, 16, 32, 4], torch.float32, device=device)
    index = assign(kind, 19, 4, torch.Generator().manual_seed(0))
    impls, bound_bytes = make_impls(layer, bank, index)
    x = randn(19, 64, g=generator(0), device=device)
    with torch.no_grad():
        outs = {name: fn(x) for name, fn in impls.items()}
    assert (outs["peft-mixed"] - outs["F.linear"]).abs().max() > 1e-3  # adapters do something
    for name in ("loop", "fastlora"):
        assert torch.allclose(outs[name], outs["peft-mixed"], atol=1e-4, rtol=1e-4), name
    present = index.unique().tolist()
    ranks = [8, 16, 32, 4]
    plain = 4 * (48 * 64 + 19 * (64 + 48))  # W, x, y in fp32
    assert bound_bytes["F.linear"] == plain
    for name in ("peft-mixed", "loop", "fastlora"):
        assert bound_bytes[name] == plain + 4 * sum(ranks[i] for i in present) * (64 + 48)
