"""fastlora.serve under bad input and faults: requests and capacities are checked when given,
a step whose forward raises puts the server back as it was (nothing lost), callbacks that
raise fail their own request only, and ``generate`` that raises leaves nothing queued.

A tiny Llama on the PyTorch backend (the kernels are tested in test_serve.py); faults are
injected by hooks that raise inside the model's forward."""
import pytest
import torch

from serve_models import VOCAB, decode_fails_once, random_adapter, random_prompts, tiny_llama
from fastlora.serve import AdapterPool, Server

pytest.importorskip("transformers")

MODULES = ("q_proj", "v_proj")
POISON = 47  # a prompt holding this token makes the embedding raise in a prefill


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")


def server_of(device, max_batch=8, **kw):
    model = tiny_llama(device, 90)
    pool = AdapterPool(model, slots=2, max_rank=4)
    pool.register("a", random_adapter(model, 91, 2, MODULES))
    pool.register("b", random_adapter(model, 92, 2, MODULES))
    return Server(model, pool, max_batch=max_batch, **kw)


def alone(server, prompt, adapter, n):
    """The tokens of one request run by itself on ``server`` (idle before and after)."""
    assert server.idle
    return server.generate([prompt], [adapter], max_new_tokens=n)[0]


def poison_prefills(model):
    """The embedding raises on a prefill (more than one position) holding ``POISON``."""
    def hook(module, args):
        ids = args[0]
        if ids.shape[1] > 1 and bool((ids == POISON).any()):
            raise RuntimeError("poisoned prefill")
    return model.get_input_embeddings().register_forward_pre_hook(hook)


def test_submit_checks_each_argument(device):
    server = server_of(device)
    cases = [
        (dict(prompt=[1, VOCAB]), ValueError, rf"prompt holds token id {VOCAB}, outside .*\[0, {VOCAB}\)"),
        (dict(prompt=[-1, 2]), ValueError, r"prompt holds token id -1"),
        (dict(prompt=torch.tensor([[1, 2]])), TypeError, r"prompt must be token ids.*shape \(1, 2\)"),
        (dict(prompt=torch.tensor([1.0, 2.0])), TypeError, r"prompt must be token ids.*float32"),
        (dict(prompt=[1, 2.5]), TypeError, r"prompt must hold integer token ids, got 2.5"),
        (dict(prompt="hello"), TypeError, r"prompt must be token ids, not text"),
        (dict(prompt=7), TypeError, r"prompt must be token ids .* got int"),
        (dict(prompt=[]), ValueError, r"prompt is empty"),
        (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be at least 1, got 0"),
        (dict(max_new_tokens=-3), ValueError, r"max_new_tokens must be at least 1, got -3"),
        (dict(max_new_tokens=2.5), TypeError, r"max_new_tokens must be an int, got float"),
        (dict(adapter="nobody"), KeyError, r"unknown adapter 'nobody'"),
        (dict(stop=[VOCAB + 5]), ValueError, rf"stop holds token id {VOCAB + 5}"),
        (dict(on_token="print"), TypeError, r"on_token must be callable"),
    ]
    for kwargs, error, message in cases:
        kwargs = {"prompt": [1, 2], **kwargs}
        with pytest.raises(error, match=message):
            server.submit(kwargs.pop("prompt"), **kwargs)
    assert server.idle  # nothing was queued
    ok = server.submit(torch.tensor([VOCAB - 1, 0]), adapter="a", max_new_tokens=2)
    assert ok.prompt == [VOCAB - 1, 0]
    with pytest.raises(ValueError, match=rf"pad_token_id holds token id {VOCAB}"):
        Server(server.model, server.pool, pad_token_id=VOCAB)
    with pytest.raises(ValueError, match=r"eos_token_id holds token id -2"):
        Server(server.model, server.pool, eos_token_id=[3, -2])


@pytest.mark.parametrize("bad", [0, -1])
def test_capacities_are_at_least_one(device, bad):
    """A zero capacity used to be accepted and then spin in ``stream()`` (max_batch=0,
    slots=0) or fail inside torch (slots=-1)."""
    model = tiny_llama(device, 90)
    for name in ("slots", "max_rank"):
        with pytest.raises(ValueError, match=rf"{name} must be at least 1, got {bad}"):
            AdapterPool(model, **{name: bad})
    with pytest.raises(TypeError, match=r"slots must be an int, got float"):
        AdapterPool(model, slots=2.0)
    pool = AdapterPool(model, slots=1, max_rank=2)
    with pytest.raises(ValueError, match=rf"max_batch must be at least 1, got {bad}"):
        Server(model, pool, max_batch=bad)


def test_a_failed_prefill_loses_no_request(device):
    """A prefill whose forward raises puts its requests back in the queue, in order; they
    are then prefilled one at a time, so the request that makes the forward fail fails
    alone (with the error recorded on it) and every other request gets its own tokens, the
    running ones included."""
    server = server_of(device)
    ps = random_prompts(93, [4, 3, 5, 2])
    ps[2][1] = POISON
    want = {i: alone(server, ps[i], a, 4) for i, a in [(0, "a"), (1, None), (3, "b")]}
    hook = poison_prefills(server.model)
    first = server.submit(ps[0], adapter="a", max_new_tokens=4)
    server.step()  # first is running
    batch = [server.submit(p, adapter=a, max_new_tokens=4)
             for p, a in zip(ps[1:], [None, "b", "b"])]
    with pytest.raises(RuntimeError, match="poisoned prefill"):
        server.step()
    assert list(server.waiting) == batch and server.running == [first]
    assert len(first.tokens) == 2  # its decode of that step stands
    errors = []
    while not server.idle:
        try:
            server.step()
        except RuntimeError as e:
            errors.append(e)
    hook.remove()
    poisoned = batch[1]
    assert len(errors) == 1 and poisoned.error is errors[0] and poisoned.done
    assert poisoned.tokens == []
    assert first.tokens == want[0] and batch[0].tokens == want[1] and batch[2].tokens == want[3]
    assert all(r.error is None for r in [first, batch[0], batch[2]])


def test_a_failed_decode_is_rolled_back(device):
    """A decode whose forward raises after some layers appended to the cache: the running
    requests keep their state, and the next steps give the same tokens as without the
    failure. Eager decode (a hook does not run at CUDA-graph replays; test_serve_graphs
    covers the static cache's rollback)."""
    server = server_of(device, cuda_graphs=False)
    ps = random_prompts(94, [3, 5])
    want = [alone(server, p, a, 5) for p, a in zip(ps, ["a", "b"])]
    requests = [server.submit(p, adapter=a, max_new_tokens=5) for p, a in zip(ps, ["a", "b"])]
    decode_fails_once(server, requests)
    while not server.idle:
        server.step()
    assert [r.tokens for r in requests] == want


def test_a_raising_callback_fails_its_request_only(device):
    server = server_of(device)
    ps = random_prompts(95, [4, 3, 5])
    want = [alone(server, p, a, 4) for p, a in zip(ps, ["a", None, "b"])]
    seen = {}

    def record(request, token):
        seen.setdefault(request.id, []).append(token)

    def disconnect(request, token):
        record(request, token)
        if len(request.tokens) == 2:
            raise ConnectionResetError("client went away")

    requests = [server.submit(p, adapter=a, max_new_tokens=4, on_token=cb)
                for p, a, cb in zip(ps, ["a", None, "b"], [record, disconnect, record])]
    emitted = []
    for pair in server.stream():  # never raises
        emitted.append(pair)
    gone = requests[1]
    assert gone.done and isinstance(gone.error, ConnectionResetError)
    assert gone.tokens == want[1][:2] and seen[gone.id] == gone.tokens
    for r, w in zip([requests[0], requests[2]], [want[0], want[2]]):
        assert r.error is None and r.tokens == w and seen[r.id] == w
    assert sum(r is gone for r, _ in emitted) == 2


def test_a_callback_sees_the_committed_state(device):
    """Callbacks run after the step: the request already holds its token, and the server
    may be used from inside (here: cancelling on the first token)."""
    server = server_of(device)
    states = []

    def cancel_at_once(request, token):
        states.append((list(request.tokens), request in server.running))
        server.cancel(request)

    r = server.submit(random_prompts(96, [3])[0], adapter="a", max_new_tokens=5, on_token=cancel_at_once)
    list(server.stream())
    assert states == [([r.tokens[0]], True)] and len(r.tokens) == 1 and server.idle


def test_generate_that_raises_leaves_nothing_queued(device):
    server = server_of(device)
    ps = random_prompts(97, [3, 4])
    with pytest.raises(KeyError, match="unknown adapter 'unknown'"):
        server.generate(ps, ["a", "unknown"], max_new_tokens=2)
    assert server.idle
    with pytest.raises(ValueError, match="prompt holds token id"):
        server.generate([ps[0], [VOCAB]], ["a", "b"], max_new_tokens=2)
    assert server.idle
    with pytest.raises(ValueError, match="zip"):
        server.generate(ps, ["a"], max_new_tokens=2)
    assert server.idle
    hook = poison_prefills(server.model)
    with pytest.raises(RuntimeError, match="poisoned prefill"):
        server.generate([ps[0], [1, POISON]], ["a", "b"], max_new_tokens=3)
    hook.remove()
    assert server.idle and server._batch is None
    assert server.generate(ps, ["a", None], max_new_tokens=2) == \
        [alone(server, ps[0], "a", 2), alone(server, ps[1], None, 2)]
