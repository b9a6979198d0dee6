"""fastlora.serve's decode through CUDA graphs (``fastlora.serve.graphs``): buckets and
padding, the static KV cache, and re-validation of what a graph captured (the bank's
storage, DoRA buffers paged in after capture, bank growth, the model's weights).

On the CPU the graph path runs with an eager stand-in for the capture (``eager_graphs``):
the step is warmed up as before a capture and every "replay" asserts that the bank layout
and the model's tensors are those it was captured over, so a stale replay fails the test.
The ``gpu_smoke`` tests capture and replay real CUDA graphs and compare their tokens with
the eager server's."""
import copy

import pytest
import torch

from data import generator, randn
from serve_models import decode_fails_once, random_adapter, random_prompts, tiny_llama
from fastlora.adapters.bank import AdapterBank
from fastlora.serve import AdapterPool, Server
from fastlora.serve import graphs as graphs_module
from fastlora.serve.graphs import GraphDecoder, bucket_for, buckets

pytest.importorskip("transformers")

MODULES = ("q_proj", "v_proj", "down_proj")
ADAPTERS = {"a": (2, False), "b": (3, False), "c": (1, False), "d": (2, True)}  # rank, DoRA


def server_of(model, *, dora_buffers=False, slots=3, **kw):
    pool = AdapterPool(model, slots=slots, max_rank=4, dora=dora_buffers)
    for i, (name, (rank, dora)) in enumerate(ADAPTERS.items()):
        pool.register(name, random_adapter(model, 81 + i, rank, MODULES, dora))
    return Server(model, pool, max_batch=8, **kw)


def scenario(server, after_capture=None):
    """Requests join and leave between steps over 1 to 4 rows (buckets 1, 2, 4: padding);
    adapters page through 3 slots; the DoRA adapter "d" is first paged in after the first
    graphs were captured (``after_capture(server)`` runs then). Tokens per request."""
    ps = random_prompts(82, [3, 5, 2, 12, 4, 3, 9])  # 12 and 9 join shorter rows: shifted right
    plan = [(0, 0, "a", 6), (0, 1, None, 3), (2, 2, "b", 5), (2, 3, "c", 7), (3, 4, "d", 5),
            (5, 5, "a", 4), (9, 6, "d", 3)]  # (step, prompt, adapter, max_new_tokens)
    requests = {}
    for step in range(40):
        for at, i, name, n in plan:
            if at == step:
                requests[i] = server.submit(ps[i], adapter=name, max_new_tokens=n)
        if step == 3 and after_capture is not None:
            after_capture(server)
        server.step()
        if step > 9 and server.idle:
            break
    assert server.idle
    return [requests[i].tokens for i in range(len(plan))]


@pytest.fixture
def eager_graphs(monkeypatch):
    """The graph path on any device with an eager stand-in for capture and replay; returns
    the buckets "captured", in order."""
    captured = []

    def state(step):
        tensors = [*step.model.parameters(), *step.model.buffers()]
        return step.bank.layout(), [(t.data_ptr(), t.dtype, t._version) for t in tensors]

    def capture(step, device):
        step.warm_up()
        at_capture = state(step)
        captured.append(step.rows)

        def replay():
            assert state(step) == at_capture, "a graph replayed over state it did not capture"
            step()
        return replay

    monkeypatch.setattr(GraphDecoder, "devices", ("cpu", "cuda"))
    monkeypatch.setattr(GraphDecoder, "capture", staticmethod(capture))
    return captured


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch, device):
    if device == "cpu":  # the kernels' interpreter is slow; test_serve.py runs them
        monkeypatch.setenv("FASTLORA_BACKEND", "torch")


# ------------------------------------------------------------ buckets


def test_buckets_as_vllm_up_to_max_batch():
    assert buckets(1) == (1,)
    assert buckets(3) == (1, 2, 3)
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(20) == (1, 2, 4, 8, 16, 20)
    assert buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    sizes = buckets(32)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 4, 5, 9, 17, 25, 32)] == \
        [1, 2, 4, 4, 8, 16, 24, 32, 32]
    with pytest.raises(ValueError, match="33 rows exceed the largest bucket"):
        bucket_for(33, sizes)


# ------------------------------------------------------------ options


def test_cpu_decodes_eagerly_unless_told(device):
    if device != "cpu":
        pytest.skip("checks the CPU default")
    server = server_of(tiny_llama(device, 80, sharp_attention=True))
    assert server.graphs is None and "on cpu" in server.why_eager and server.max_length is None
    with pytest.raises(ValueError, match="cuda_graphs=True: the model is on cpu"):
        server_of(tiny_llama(device, 80, sharp_attention=True), cuda_graphs=True)
    assert server_of(tiny_llama(device, 80, sharp_attention=True), cuda_graphs=False).why_eager == "cuda_graphs=False"
    with pytest.raises(TypeError, match="cuda_graphs must be True, False or None"):
        server_of(tiny_llama(device, 80, sharp_attention=True), cuda_graphs="yes")


def test_max_length_refuses_longer_requests(device, eager_graphs):
    server = server_of(tiny_llama(device, 80, sharp_attention=True), cuda_graphs=True)
    assert server.max_length == 64  # max_position_embeddings, under 2048
    server = server_of(tiny_llama(device, 80, sharp_attention=True), cuda_graphs=True, max_length=10)
    with pytest.raises(ValueError, match="prompt of 4 tokens and max_new_tokens=7 exceed the "
                                         "server's max_length=10 .the static KV cache"):
        server.submit([1, 2, 3, 4], max_new_tokens=7)
    server.submit([1, 2, 3, 4], max_new_tokens=6)
    with pytest.raises(ValueError, match="max_length must be"):
        server_of(tiny_llama(device, 80, sharp_attention=True), max_length=0)


# ------------------------------------------------------------ the static path


def test_static_decode_gives_the_eager_tokens(device, eager_graphs):
    """Joins, leaves, padding to buckets, paging, a DoRA adapter paged in after capture:
    the graph path's tokens are the eager server's; the DoRA page-in (no DoRA buffers up
    front) re-captures, with the reason counted."""
    model = tiny_llama(device, 80, sharp_attention=True)
    want = scenario(server_of(copy.deepcopy(model), cuda_graphs=False))
    server = server_of(model, cuda_graphs=True)
    seen = {}
    got = scenario(server, after_capture=lambda s: seen.update(captures=list(eager_graphs)))
    assert got == want
    graphs = server.graphs
    assert seen["captures"] and set(eager_graphs) == {1, 2, 4}
    assert graphs.replays > 0 and graphs.disabled is None
    dora = [why for why in graphs.invalidations if "DoRA buffers" in why]
    assert dora and graphs.captures == len(eager_graphs) > len(set(eager_graphs))


def test_preallocated_dora_buffers_keep_their_storage(device, eager_graphs):
    """With AdapterPool(dora=True) a DoRA page-in after capture writes in place: the bank's
    tensors keep their addresses and no graph is captured again."""
    model = tiny_llama(device, 80, sharp_attention=True)
    want = scenario(server_of(copy.deepcopy(model), cuda_graphs=False))
    server = server_of(model, cuda_graphs=True, dora_buffers=True)
    ptrs = {}

    def record(s):
        ptrs.update({name: [t.data_ptr() for t in layer.tensors()]
                     for name, layer in s.pool.bank.layers.items()})
    got = scenario(server, after_capture=record)
    assert got == want
    bank = server.pool.bank
    assert any(layer._dora[bank.slot("d")] for layer in bank.layers.values() if "d" in bank)
    assert ptrs == {name: [t.data_ptr() for t in layer.tensors()]
                    for name, layer in bank.layers.items()}
    assert all(layer.magnitude is not None for layer in bank.layers.values())
    assert not server.graphs.invalidations and sorted(eager_graphs) == [1, 2, 4]


def test_changed_weights_are_captured_again(device, eager_graphs):
    """A weight written in place (a new version) or replaced between steps: the graphs are
    captured again before the next step, and the tokens follow the new weights."""
    model = tiny_llama(device, 80, sharp_attention=True)
    twin = copy.deepcopy(model)

    def change(m):
        with torch.no_grad():
            m.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().flip(0))

    eager = server_of(twin, cuda_graphs=False)
    server = server_of(model, cuda_graphs=True)
    ps = random_prompts(83, [3, 4])
    for s in (eager, server):
        requests = [s.submit(p, adapter=a, max_new_tokens=6) for p, a in zip(ps, ["d", None])]
        for _ in range(3):
            s.step()
        change(s.model)
        list(s.stream())
        s.tokens = [r.tokens for r in requests]
    assert server.tokens == eager.tokens
    assert server.graphs.invalidations == {
        "the model's parameters or buffers changed (replaced, cast, moved or written in place)": 1}
    assert eager_graphs == [2, 2]


def test_bank_growth_changes_the_layout_and_is_named():
    """A bank that grows (new storage, more slots) no longer has the layout a graph
    captured; the decoder names the change."""
    layer = torch.nn.Linear(8, 6)
    bank = AdapterBank(layer, capacity=1, max_rank=4)
    g = generator(84)
    bank.add("a", randn(2, 8, g=g), randn(6, 2, g=g), 1.0)
    before, version = bank.layout(), bank.slots.version
    bank.add("b", randn(2, 8, g=g), randn(6, 2, g=g), 1.0)  # full: doubles
    after = bank.layout()
    assert bank.capacity == 2 and bank.slots.version != version and after != before
    assert graphs_module._why((before, ()), (after, ())) == \
        "the adapter bank grew (1 -> 2 slots)"
    ptrs = [t.data_ptr() for t in bank[""].tensors() if t is not None]
    bank.add("a", randn(2, 8, g=g), randn(6, 2, g=g), 2.0, replace=True)  # in place
    assert bank.layout() == after and ptrs == [t.data_ptr() for t in bank[""].tensors()
                                               if t is not None]


def test_dora_buffers_up_front_or_at_the_first_dora_adapter():
    layer = torch.nn.Linear(8, 6)
    g = generator(85)
    lazy, eager = AdapterBank(layer, capacity=2, max_rank=4), AdapterBank(layer, capacity=2,
                                                                         max_rank=4, dora=True)
    lora = (randn(2, 8, g=g), randn(6, 2, g=g), 1.0)
    dora = (randn(2, 8, g=g), randn(6, 2, g=g), 1.0, layer.weight.detach().norm(dim=1) * 1.2)
    for bank in (lazy, eager):
        bank.add("lora", *lora)
    assert lazy[""].magnitude is None and eager[""].magnitude is not None
    before = eager.layout()
    for bank in (lazy, eager):
        bank.add("dora", *dora)
    assert eager.layout() == before
    assert lazy[""].magnitude is not None
    x = randn(4, 8, g=g)
    for names in (["lora", "dora", None, "dora"], [None, "lora", "lora", None]):
        want = torch.stack([_one(lazy, layer, x[i], n) for i, n in enumerate(names)])
        got = torch.stack([_one(eager, layer, x[i], n) for i, n in enumerate(names)])
        torch.testing.assert_close(got, want)


def _one(bank, layer, x, name):
    import fastlora

    return fastlora.multi_lora_linear(x[None], layer.weight, layer.bias, bank[""],
                                      bank.index([name]))[0]


def test_a_failed_static_decode_is_rolled_back(device, eager_graphs):
    """A decode whose forward raises after some layers wrote their column: the column
    counters and the mask go back, and the next steps give the tokens of a run without
    the failure."""
    model = tiny_llama(device, 80, sharp_attention=True)
    ps = random_prompts(86, [3, 5])
    eager = server_of(copy.deepcopy(model), cuda_graphs=False)
    want = eager.generate(ps, ["a", "d"], max_new_tokens=6)
    server = server_of(model, cuda_graphs=True)
    requests = [server.submit(p, adapter=a, max_new_tokens=6) for p, a in zip(ps, ["a", "d"])]
    decode_fails_once(server, requests)
    assert int(server.graphs.kv.columns.unique()) == server._batch.width
    list(server.stream())
    assert [r.tokens for r in requests] == want


# ------------------------------------------------------------ real graphs


@pytest.mark.gpu
@pytest.mark.gpu_smoke
@pytest.mark.parametrize("dora_buffers", [False, True])
def test_gpu_graph_decode_gives_the_eager_tokens(dora_buffers):
    """Real CUDA graphs (Triton kernels): requests join and leave, adapters page in and out
    between steps, a DoRA adapter is paged in after the first captures; every token equals
    the eager server's. Without DoRA buffers up front that page-in re-captures; with them
    nothing is captured again."""
    model = tiny_llama("cuda", 80, sharp_attention=True)
    want = scenario(server_of(copy.deepcopy(model), cuda_graphs=False,
                              dora_buffers=dora_buffers))
    server = server_of(model, dora_buffers=dora_buffers)  # the default on CUDA: graphs
    assert server.graphs is not None and server.why_eager is None
    seen = {}
    got = scenario(server, after_capture=lambda s: seen.update(captures=s.graphs.captures))
    graphs = server.graphs
    assert graphs.disabled is None, graphs.disabled
    assert got == want
    assert seen["captures"] >= 1 and graphs.replays > graphs.captures
    redone = sum(n for why, n in graphs.invalidations.items() if "DoRA buffers" in why)
    assert (redone == 0) if dora_buffers else (redone == 1)


@pytest.mark.gpu
@pytest.mark.gpu_smoke
def test_gpu_graphs_follow_page_ins_and_replaced_adapters():
    """Replays after adapters were paged in, replaced in place and unloaded between steps
    read the bank's new contents (same storage: no re-capture) and give the eager tokens."""
    model = tiny_llama("cuda", 80, sharp_attention=True)
    servers = [server_of(copy.deepcopy(model), cuda_graphs=flag, dora_buffers=True, slots=2)
               for flag in (False, True)]
    ps = random_prompts(87, [4, 3, 5])
    out = []
    for s in servers:
        requests = [s.submit(ps[0], adapter="a", max_new_tokens=8),
                    s.submit(ps[1], adapter="b", max_new_tokens=8)]
        for _ in range(3):
            s.step()
        s.load("a", random_adapter(s.model, 88, 2, MODULES, True), replace=True)  # a DoRA version, in place
        for _ in range(2):
            s.step()
        requests.append(s.submit(ps[2], adapter="c", max_new_tokens=4))  # waits: 2 slots
        list(s.stream())
        out.append([r.tokens for r in requests])
    graphs = servers[1].graphs
    assert out[1] == out[0]
    assert graphs.disabled is None and graphs.replays > 0 and not graphs.invalidations
