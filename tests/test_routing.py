"""fastlora.adapters.routing.Routing: made once per batch, reused by every layer of a forward (no
per-layer checks or grouping), one entry per sequence serving prefill and decode row
counts, static buffers rewritten in place for CUDA graphs."""

import pytest
import torch

import fastlora
from data import generator, randint, randn
from fastlora.ops import checks
from fastlora import multi_lora_linear, reference
from fastlora.adapters.bank import AdapterBank
from fastlora.kernels import multi_meta
from fastlora.adapters.routing import Routing
from helpers import assert_close
from spies import count_calls

from common import capture

K, N = 40, 36


def layers_and_bank(device, n_layers=3, ranks=(4, 1, 8, 3), dora=(False, True, False, False)):
    """A stack of Linear(K, K) layers (the last K -> N) with adapters t0.. on every layer."""
    g = generator(30)
    sizes = [(K, K)] * (n_layers - 1) + [(N, K)]
    model = torch.nn.Sequential(*[torch.nn.Linear(k, n, device=device) for n, k in sizes])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(*p.shape, g=g, device=device, scale=p.shape[-1] ** -0.5))
    bank = AdapterBank(model, max_rank=8)
    for i, (r, d) in enumerate(zip(ranks, dora)):
        layers = {}
        for name, (n, k) in zip(map(str, range(n_layers)), sizes):
            A, B = randn(r, k, g=g, scale=k ** -0.5), randn(n, r, g=g, scale=r ** -0.5)
            m = model.get_submodule(name).weight.norm(dim=1).detach().cpu() * 1.1 if d else None
            layers[name] = (A, B, 0.5 + 0.25 * i, m)
        bank.load(f"t{i}", layers)
    return model, bank


def forward(model, bank, x, index):
    for i, layer in enumerate(model):
        x = multi_lora_linear(x, layer.weight, layer.bias, bank[str(i)], index)
    return x


def per_layer_reference(model, bank, x, rows):
    """Each layer through fastlora.reference with the per-row index ``rows``, in float64."""
    x = x.double()
    for i, layer in enumerate(model):
        packed = bank[str(i)].packed()
        packed = packed.map(torch.Tensor.double)
        x = reference.multi_lora_linear(x, layer.weight.double(), layer.bias.double(),
                                        packed, rows)
    return x


def test_one_routing_serves_every_layer_without_per_layer_work(monkeypatch, device):
    """Made once, a routing is checked and grouped once per row count: three layers call
    neither the index check nor group_rows again; decode batches (at most GATHER_MAX_M
    rows, here 16) are never grouped."""
    monkeypatch.setattr(multi_meta, "GATHER_MAX_M", 16)
    model, bank = layers_and_bank(device)
    names = ["t0", None, "t2", "t1", "t3", "t0", "__base__"]
    routing = bank.index(names)
    g = generator(31)
    x = randn(len(names), 5, K, g=g, device=device)  # [B, T, K]: 5 rows per sequence
    counts = count_calls(monkeypatch, (checks, "check_index"), (multi_meta, "group_rows"))
    with torch.no_grad():
        y = forward(model, bank, x, routing)
        assert counts == {"check_index": 0, "group_rows": 1}
        y_decode = forward(model, bank, x[:, :1], routing)  # 1 row per sequence: gathered
        assert counts == {"check_index": 0, "group_rows": 1}
        forward(model, bank, x, routing)
        assert counts == {"check_index": 0, "group_rows": 1}
    rows = torch.tensor([-1 if a in (None, "__base__") else int(a[1]) for a in names])
    want = per_layer_reference(model, bank, x, rows.repeat_interleave(5).view(len(names), 5))
    assert_close(y, want, torch.float32, "per-sequence routing over [B, T, K]")
    assert_close(y_decode, per_layer_reference(model, bank, x[:, :1], rows[:, None]),
                 torch.float32, "decode rows")


def test_decode_training_groups_once_per_routing(monkeypatch, device):
    """A differentiable decode batch gathers in the forward; its backward works on grouped
    rows, made once per routing (in the forward), not once per layer; the gradients match
    the per-layer reference."""
    model, bank = layers_and_bank(device)
    names = ["t0", None, "t2", "t1", "t3", "t0"]
    routing = bank.index(names)
    x = randn(len(names), K, g=generator(35), device=device, requires_grad=True)
    counts = count_calls(monkeypatch, (multi_meta, "group_rows"))
    forward(model, bank, x, routing).square().sum().backward()
    assert counts == {"group_rows": 1}
    rows = torch.tensor([-1 if a is None else int(a[1]) for a in names])
    x64 = x.detach().double().requires_grad_()
    per_layer_reference(model, bank, x64, rows).square().sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "dx through three layers")


def test_routing_from_an_index_tensor_equals_the_tensor(device):
    model, bank = layers_and_bank(device, n_layers=1)
    g = generator(32)
    index = randint(-1, 4, (23,), g=g, device=device)
    x = randn(23, K, g=g, device=device)
    with torch.no_grad():
        direct = forward(model, bank, x, index)
        routed = forward(model, bank, x, Routing.from_index(index, bank.capacity, slots=bank.slots))
    assert torch.equal(direct, routed)


def test_static_decode_routing_sorts_nothing(monkeypatch, device):
    """A static routing for a decode bucket (at most GATHER_MAX_M rows) never groups its
    rows, neither when made nor on assign (the layers gather each row's adapter); a larger
    one groups when made and on every assign."""
    model, bank = layers_and_bank(device)
    counts = count_calls(monkeypatch, (multi_meta, "group_rows"))
    names = ["t0", None, "t2", "t1", "t3", "t0"]
    routing = bank.static_index(6, rows=12)
    bank.assign(routing, names)
    x = randn(12, K, g=generator(34), device=device)
    with torch.no_grad():
        y = forward(model, bank, x, routing)
    assert counts == {"group_rows": 0}
    monkeypatch.setattr(multi_meta, "GATHER_MAX_M", 8)
    bank.assign(bank.static_index(6, rows=12), names)
    assert counts == {"group_rows": 2}
    rows = torch.tensor([-1 if a is None else int(a[1]) for a in names]).repeat_interleave(2)
    assert_close(y, per_layer_reference(model, bank, x, rows), torch.float32, "static decode")


def test_static_routing_same_buffers_new_assignment(device):
    """The CUDA-graph mechanism on any device: the buffers a captured step reads keep their
    addresses across assign(); the outputs follow the new assignment."""
    model, bank = layers_and_bank(device)
    routing = bank.static_index(6, rows=12)  # 6 sequences, 2 rows each
    row_index, groups = routing.row_index(12), routing.groups(12)
    addresses = [t.data_ptr() for t in (routing.index, row_index, groups.perm, groups.keys,
                                        groups.seg)]
    g = generator(33)
    x = randn(6, 2, K, g=g, device=device)
    with torch.no_grad():
        base = forward(model, bank, x, routing)  # all base rows until assigned
        assert_close(base, per_layer_reference(model, bank, x, torch.full((6, 2), -1)),
                     torch.float32, "unassigned: base")
        for names in (["t0", "t1", None, "t3", "t2", "t0"], ["t3", "t3", "t1", None, None, "t2"]):
            bank.assign(routing, names)
            assert [t.data_ptr() for t in (routing.index, row_index, groups.perm, groups.keys,
                                           groups.seg)] == addresses
            fresh = forward(model, bank, x, bank.index(names))
            assert torch.equal(forward(model, bank, x, routing), fresh)
            decode = routing.row_index(12)  # the decode kernels' per-row slots
            assert decode.data_ptr() == row_index.data_ptr()
            assert decode.tolist() == [bank.slot(a) if a else -1 for a in names for _ in range(2)]
        bank.assign(routing, torch.tensor([0, 0, 1, 1, -1, 3], device=device))
        assert torch.equal(forward(model, bank, x, routing),
                           forward(model, bank, x, bank.index(["t0", "t0", "t1", "t1", None, "t3"])))
    with pytest.raises(ValueError, match="serves batches of 12 rows, got 6"):
        forward(model, bank, x[:, :1], routing)
    with pytest.raises(ValueError, match="has 6 entries, got 5"):
        bank.assign(routing, ["t0"] * 5)
    with pytest.raises(TypeError, match="static routing"):
        bank.index(["t0"]).assign(["t1"], bank.slot)
    with pytest.raises(ValueError, match="entries > 0 dividing rows"):
        bank.static_index(5, rows=12)


def test_routing_errors(device):
    model, bank = layers_and_bank(device, n_layers=1)
    x = randn(6, K, g=generator(34), device=device)
    layer = model[0]
    with pytest.raises(ValueError, match="4 entries .* 6 rows"):
        multi_lora_linear(x, layer.weight, layer.bias, bank["0"], bank.index(["t0"] * 4))
    other = AdapterBank(model, max_rank=8)
    other.add("t0", randn(2, K, g=generator(35)), randn(N, 2, g=generator(36)), 1.0, layer="0")
    with pytest.raises(ValueError, match="made by another AdapterBank"):
        multi_lora_linear(x, layer.weight, layer.bias, bank["0"], other.index(["t0"] * 6))
    plain = Routing.from_index(torch.zeros(6, dtype=torch.int32, device=device), bank.capacity)
    with pytest.raises(ValueError, match="come from an AdapterBank"):
        multi_lora_linear(x, layer.weight, layer.bias, bank["0"], plain)
    stale = bank.index(["t0"] * 6)
    for i in range(4, 9):  # the bank grows from 8 to 16 slots
        bank.add(f"more{i}", randn(2, K, g=generator(i)), randn(N, 2, g=generator(i)), 1.0,
                 layer="0")
    with pytest.raises(ValueError, match="for 8 adapter slots, the layer's bank has 16"):
        multi_lora_linear(x, layer.weight, layer.bias, bank["0"], stale)


def test_compiled_forward_takes_a_new_routing_without_recompiling(device):
    """Under torch.compile a routing is a graph input like the index tensor: a new routing
    for the next batch reuses the compiled graph. The generation check of a stale routing
    runs where the routing is validated outside the graph (``validate``)."""
    model, bank = layers_and_bank(device, n_layers=1)
    layer = model[0]
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    fn = torch.compile(lambda x, r: multi_lora_linear(x, layer.weight, layer.bias, bank["0"], r),
                       backend=backend, fullgraph=True)
    g = generator(37)
    x = randn(3, K, g=g, device=device)
    first_routing = bank.index(["t0", None, "t2"])
    with torch.no_grad():
        fn(x, first_routing)
        A2, B2 = randn(3, K, g=g, device=device), randn(N, 3, g=g, device=device)  # in place
        bank.add("t0", A2, B2, 0.5, layer="0", replace=True)
        with pytest.raises(RuntimeError, match="adapter 't0' in slot 0, which was replaced"):
            first_routing.validate()
        second = fn(x, bank.index(["t0", None, "t2"]))
        want = fastlora.lora_linear(x, layer.weight, layer.bias, A2, B2, 0.5)
    assert len(compiles) == 1
    assert_close(second[0], want[0].double(), torch.float32, "replaced under compile")


@pytest.mark.gpu
@pytest.mark.gpu_smoke
def test_gpu_captured_decode_step_replays_new_assignments():
    """A three-layer decode step over a static routing captured in a CUDA graph: each
    replay after assign() equals the eager step with a fresh routing."""
    model, bank = layers_and_bank("cuda")
    routing = bank.static_index(16)
    x = randn(16, K, g=generator(38), device="cuda")
    out = {}

    def step():
        out["y"] = forward(model, bank, x, routing)

    with torch.no_grad():
        bank.assign(routing, ["t0"] * 16)
        graph = capture(step)
        g = generator(39)
        for _ in range(3):
            names = [None if i < 0 else f"t{i}" for i in randint(-1, 4, (16,), g=g).tolist()]
            bank.assign(routing, names)
            graph.replay()
            eager = forward(model, bank, x, bank.index(names))
            assert torch.equal(out["y"], eager), names
