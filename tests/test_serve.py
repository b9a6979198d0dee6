"""fastlora.serve on a tiny Llama built from a config (no download): attach/detach and
routed forwards, the adapter pool (paging, least-recently-used eviction, formats), and the
continuous-batching server, whose tokens per request equal PEFT's single-adapter greedy
generation for that request while requests join, leave, and adapters are paged, replaced
and unloaded between steps."""
import copy
import functools

import pytest
import torch

from data import generator, randint, randn
from fastlora.adapters.bank import AdapterBank
from fastlora.io import load_adapter, save_adapter
from fastlora.serve import AdapterPool, Server, attach, detach, is_attached, routed

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"a0": (1, False), "a1": (2, False), "a2": (4, True), "a3": (8, False),
            "a4": (3, True)}  # name: (rank, DoRA)


def seeded_(model, seed, only=""):
    """Every parameter (whose name holds ``only``) from a seeded generator (not the init's
    global RNG); logits spread wide (lm_head x 8), so that greedy tokens never hinge on
    rounding."""
    g = generator(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only not in name:
                continue
            if "magnitude" in name:
                p.mul_(1 + 0.3 * randn(*p.shape, g=g))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * randn(*p.shape, g=g))
            else:
                scale = 0.4 if "lora_B" in name else p.shape[-1] ** -0.5
                p.copy_(randn(*p.shape, g=g, scale=scale * (8 if "lm_head" in name else 1)))
    return model


@functools.cache
def family(root):
    """(the base model, a PEFT model holding adapters a0..a4, their saved directories), on
    the CPU; built once per test session."""
    from pathlib import Path

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=VOCAB, max_position_embeddings=64,
                                      eos_token_id=None)  # no stop token: every token asked for
    base = seeded_(transformers.LlamaForCausalLM(config), 70).eval()
    model = None
    for name, (r, dora) in ADAPTERS.items():
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=dora)
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    seeded_(model, 71, only="lora_")
    model.requires_grad_(False)
    model.eval().save_pretrained(str(root))
    return base, model, {name: Path(root) / name for name in ADAPTERS}


@pytest.fixture
def models(tmp_path_factory, device):
    base, peft_model, dirs = family(tmp_path_factory.getbasetemp() / "serve-adapters")
    return copy.deepcopy(base).to(device), copy.deepcopy(peft_model).to(device), dirs


def reference(peft_model, prompt, adapter, n):
    """PEFT's greedy generation of ``n`` tokens for one request with its adapter alone."""
    ids = torch.tensor([prompt], device=peft_model.device)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
              do_sample=False, pad_token_id=0)
    if adapter is None:
        with peft_model.disable_adapter():
            out = peft_model.generate(**kw)
    else:
        peft_model.set_adapter(adapter)
        out = peft_model.generate(**kw)
    return out[0, len(prompt):].tolist()


def prompts(seed, lengths):
    g = generator(seed)
    return [randint(1, VOCAB, (n,), g=g).tolist() for n in lengths]


def pool_of(base, dirs, slots, names=ADAPTERS):
    pool = AdapterPool(base, slots=slots, max_rank=8)
    for name in names:
        pool.register(name, dirs[name])
    return pool


def test_requests_join_and_leave_mid_stream(models):
    base, peft_model, dirs = models
    server = Server(base, pool_of(base, dirs, slots=8), max_batch=8)
    streamed = {}
    batches = []

    def submit(prompt, adapter, n):
        return server.submit(prompt, adapter=adapter, max_new_tokens=n,
                             on_token=lambda r, t: streamed.setdefault(r.id, []).append(t))

    first = [submit(p, a, n) for p, a, n in zip(prompts(72, [5, 3, 7]), ["a0", None, "a2"],
                                                  [6, 2, 7])]
    for _ in range(2):
        server.step()
        batches.append({r.id for r in server.running})
    later = [submit(p, a, n) for p, a, n in zip(prompts(73, [4, 9]), ["a4", "a0"], [5, 3])]
    server.step()
    batches.append({r.id for r in server.running})
    last = submit(prompts(74, [2])[0], "a3", 4)
    stop_at = reference(peft_model, prompts(81, [3])[0], "a1", 6)[1]
    stopped = server.submit(prompts(81, [3])[0], adapter="a1", max_new_tokens=6, stop=[stop_at])
    while not server.idle:
        server.step()
        batches.append({r.id for r in server.running})
    requests = first + later + [last]
    assert any({first[0].id, later[0].id} <= b for b in batches)  # old and new decoded together
    assert first[1].id not in batches[-1]  # the short request left early
    for r in requests:
        assert r.done and streamed[r.id] == r.tokens
        assert r.tokens == reference(peft_model, r.prompt, r.adapter, r.max_new_tokens), r
    want = reference(peft_model, stopped.prompt, "a1", 6)
    assert stopped.done and stopped.tokens == want[:want.index(stop_at) + 1]


def test_pool_smaller_than_the_registered_adapters(models):
    """Two device slots for five adapters: requests are admitted as their adapters fit,
    adapters are paged in and evicted, and every request still gets its own tokens."""
    base, peft_model, dirs = models
    pool = pool_of(base, dirs, slots=2)
    server = Server(base, pool, max_batch=8)
    adapters = ["a1", "a3", None, "a2", "a1", "a4", "a0"]
    requests = [server.submit(p, adapter=a, max_new_tokens=4)
                for p, a in zip(prompts(75, [3, 4, 5, 6, 3, 2, 4]), adapters)]
    while not server.idle:
        server.step()
        assert len({r.adapter for r in server.running} - {None}) <= 2
    for r in requests:
        assert r.tokens == reference(peft_model, r.prompt, r.adapter, 4), r
    assert pool.evictions >= 3 and pool.misses >= 5 and len(pool.resident) == 2
    if base.device.type == "cuda":  # host copies are pinned: asynchronous page-in
        assert all(t.A.is_pinned() for t in pool._host["a1"].layers.values())


def test_least_recently_used_is_evicted_never_the_batch(models):
    base, _, dirs = models
    pool = pool_of(base, dirs, slots=3, names=["a0", "a1", "a2", "a3"])
    pool.reserve(["a0"])
    pool.reserve(["a1", None, "a2"])
    assert pool.resident == ["a0", "a1", "a2"]
    pool.reserve(["a0"])  # a hit makes a0 the most recently used
    assert pool.resident == ["a1", "a2", "a0"] and pool.hits == 1
    pool.reserve(["a3", "a1"])  # a1 is in the batch: a2 goes; the batch is the most recent
    assert pool.resident == ["a0", "a3", "a1"] and pool.evictions == 1
    routing = pool.acquire(["a2", "a0", "a3"])  # a1 (the least recent outside the batch) goes
    assert pool.resident == ["a2", "a0", "a3"] and pool.evictions == 2
    assert routing.index.tolist() == [pool.bank.slot(a) for a in ["a2", "a0", "a3"]]
    stale = pool.route(["a0"])
    pool.reserve(["a1"])  # evicts a2 ... a0 stays resident: the stale routing still holds
    pool.reserve(["a2", "a1", "a3"])  # a0 evicted now
    with pytest.raises(RuntimeError, match="adapter 'a0' in slot .* unloaded"):
        stale.validate()
    with pytest.raises(RuntimeError, match="4 distinct adapters does not fit the pool's 3 slots"):
        pool.reserve(["a0", "a1", "a2", "a3"])
    with pytest.raises(KeyError, match="unknown adapter"):
        pool.reserve(["nope"])
    assert pool.bank.capacity == 3  # a fixed bank: never grown


def test_adapters_from_any_format(models, tmp_path):
    """PEFT directories, fastlora.io Adapters, diffusers and kohya files, kohya state dicts."""
    from safetensors.torch import load_file

    base, peft_model, dirs = models
    pool = AdapterPool(base, slots=5, max_rank=8)
    pool.register("peft-dir", dirs["a1"])
    save_adapter(load_adapter(dirs["a3"]), tmp_path / "sd.safetensors", "kohya")
    pool.register("state-dict", load_file(str(tmp_path / "sd.safetensors")))  # alphas inside
    adapter = load_adapter(dirs["a2"])
    pool.register("object", adapter)
    save_adapter(load_adapter(dirs["a0"]), tmp_path / "d.safetensors", "diffusers")
    pool.register("diffusers", tmp_path / "d.safetensors")
    save_adapter(load_adapter(dirs["a4"]), tmp_path / "k.safetensors", "kohya")
    pool.register("kohya", tmp_path / "k.safetensors")
    server = Server(base, pool)
    same = {"peft-dir": "a1", "state-dict": "a3", "object": "a2", "diffusers": "a0", "kohya": "a4"}
    ps = prompts(76, [4, 5, 3, 6, 2])
    out = server.generate(ps, list(same), max_new_tokens=3)
    for p, name, tokens in zip(ps, same, out):
        assert tokens == reference(peft_model, p, same[name], 3), name


def test_hot_replace_and_unload_between_steps(models, tmp_path):
    base, peft_model, dirs = models
    pool = pool_of(base, dirs, slots=4, names=["a1", "a3"])
    server = Server(base, pool)
    running = server.submit(prompts(77, [5])[0], adapter="a1", max_new_tokens=8)
    for _ in range(3):
        server.step()
    server.load("a1", dirs["a3"], replace=True)  # a1 now holds a3's weights
    joined = server.submit(prompts(78, [4])[0], adapter="a1", max_new_tokens=5)
    server.step()
    with pytest.raises(RuntimeError, match=r"adapter 'a1' is in use by request\(s\)"):
        server.unload("a1")
    with pytest.raises(ValueError, match="already registered"):
        server.load("a3", dirs["a3"])
    while not server.idle:
        server.step()
    assert running.done and len(running.tokens) == 8
    assert joined.tokens == reference(peft_model, joined.prompt, "a3", 5)
    server.unload("a1")
    assert "a1" not in pool and "a1" not in pool.resident and "a1" not in pool.bank
    with pytest.raises(KeyError, match="unknown adapter 'a1'"):
        server.submit([1, 2], adapter="a1")
    cancelled = server.submit(prompts(79, [3])[0], adapter="a3", max_new_tokens=20)
    server.step()
    server.cancel(cancelled)
    server.step()
    assert server.idle and len(cancelled.tokens) == 1


def test_attach_routes_each_sequence_through_its_adapter(models):
    base, peft_model, dirs = models
    plain = copy.deepcopy(base)
    bank = AdapterBank(base, max_rank=8)
    for name in ("a0", "a2", "a3"):
        bank.load(name, dirs[name])
    attached = attach(base, bank)
    assert len(attached) == 2 * len(TARGETS) + 1  # every linear layer (lm_head too)
    assert attach(base, bank) == []  # again: nothing new
    ids = torch.tensor(prompts(80, [6] * 4), device=base.device)
    names = ["a2", None, "a0", "a3"]
    with torch.no_grad():
        with routed(bank.index(names)):
            logits = base(input_ids=ids).logits
        unrouted = base(input_ids=ids).logits
        want = []
        for i, a in enumerate(names):
            if a is None:
                want.append(plain(input_ids=ids[i:i + 1]).logits)
            else:
                peft_model.set_adapter(a)
                want.append(peft_model(input_ids=ids[i:i + 1]).logits)
    torch.testing.assert_close(logits, torch.cat(want), rtol=1e-4, atol=1e-4)
    assert torch.equal(unrouted, plain(input_ids=ids).logits)
    assert len(detach(base)) == len(attached)
    assert not any(is_attached(m) for m in base.modules())
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_attach_refusals(models):
    base, peft_model, dirs = models
    with pytest.raises(ValueError, match="PEFT LoRA layer"):
        attach(peft_model, AdapterBank(peft_model))
    with pytest.raises(ValueError, match="made for another model"):
        attach(base, AdapterBank(copy.deepcopy(base)))
    base.lm_head.forward = lambda x: x
    with pytest.raises(ValueError, match="'lm_head' has its forward replaced"):
        attach(base, AdapterBank(base))
    assert not any(is_attached(m) for m in base.modules())


def test_example_is_a_thin_cli_over_fastlora_serve(monkeypatch):
    """The example end to end (the PyTorch backend: the kernels are tested above)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "serve_multi.py"
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    spec = importlib.util.spec_from_file_location("serve_multi", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--adapters", "5", "--slots", "2", "--requests", "5", "--check"]) == 0
