"""fastlora.patch on tiny PEFT models built from configs (``peft_models``): same numbers as
PEFT, same state. A spy on the fused op (the ``fused_calls`` fixture) counts how often the
fast path runs, so a test fails if the patched layers silently fall back to PEFT (or if
they run the fast path when PEFT's forward is required).
"""
from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

from fastlora.choice import backend  # noqa: E402
from fastlora.peft import PatchReport, is_patched, patch, unpatch  # noqa: E402
from helpers import CUDA, MODEL_TOL, assert_close, rel_err  # noqa: E402
from peft_models import (PATCH_MODULE, SEQ, add_adapter, assert_grads_close, ids,  # noqa: E402
                         lora_config, lora_grads, lora_layers, peft_pair, tiny_model)

# ------------------------------------------------------------------ numerics against PEFT

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_logits_and_lora_grads_match_peft(arch, fast_backend, device, fused_calls):
    model, ref = peft_pair(arch, device=device)
    report = patch(model)
    n = len(lora_layers(model))
    assert report.all_patched and len(report.patched) == n
    x = ids(device)
    out = model(x, labels=x)
    exp = ref(x, labels=x)
    assert len(fused_calls) == n, "every LoRA layer must take the fused path once"
    assert_close(out.logits, exp.logits, what="logits")
    out.loss.backward()
    exp.loss.backward()
    assert_grads_close(model, ref)


def test_conv1d_weight_is_a_transposed_view(device, fused_calls):
    model, _ = peft_pair("gpt2", device=device)
    report = patch(model)
    assert all("Conv1D" in e.notes[0] for e in report)
    model(ids(device))
    layers = list(lora_layers(model).values())
    assert len(fused_calls) == len(layers)
    for call, layer in zip(fused_calls, layers):
        w = layer.base_layer.weight  # Conv1D: [K, N]
        assert call["weight"].shape == (w.shape[1], w.shape[0])
        assert call["weight"].data_ptr() == w.data_ptr() and call["weight"]._base is not None
        assert call["bias"] is layer.base_layer.bias


@pytest.mark.parametrize("arch,optim,backend_env", [("llama", "adamw", None), ("gpt2", "sgd", "torch")])
def test_training_losses_match_peft(arch, optim, backend_env, device, monkeypatch):
    """20 steps, dropout 0: the same loss as PEFT at every step (Triton path for Llama;
    GPT-2 on the reference backend, to keep the interpreter time down)."""
    if backend_env:
        monkeypatch.setenv("FASTLORA_BACKEND", backend_env)
    model, ref = peft_pair(arch, device=device)
    patch(model)

    def make(m):
        params = [p for p in m.parameters() if p.requires_grad]
        if optim == "adamw":
            return torch.optim.AdamW(params, lr=1e-2)
        return torch.optim.SGD(params, lr=0.5)

    opts = [make(model), make(ref)]
    losses = [[], []]
    x = ids(device)
    for step in range(20):
        for k, m in enumerate((model, ref)):
            loss = m(x, labels=x).loss
            loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            losses[k].append(loss.item())
    assert losses[1][-1] < losses[1][0] - 0.05, "the reference run must learn something"
    for step, (a, b) in enumerate(zip(*losses)):
        assert abs(a - b) <= 10 * MODEL_TOL * abs(b), f"step {step}: patched {a} vs PEFT {b}"


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant, device, fused_calls):
    model, ref = peft_pair("llama", layers=2, device=device)
    for m in (model, ref):
        m.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # the checkpointed blocks' input must require grad
            m.enable_input_require_grads()
        m.train()
    patch(model)
    n = len(lora_layers(model))
    x = ids(device)
    loss = model(x, labels=x).loss
    loss.backward()
    assert len(fused_calls) == 2 * n, "the checkpointed layers must be recomputed"
    exp = ref(x, labels=x).loss
    exp.backward()
    assert_close(loss, exp, what="loss")
    assert_grads_close(model, ref)


def test_generate_same_tokens(device, fused_calls):
    model, ref = peft_pair("llama", layers=2, device=device)
    model.eval()
    ref.eval()
    patch(model)
    prompt = ids(device)[:1]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, min_new_tokens=4)
    out = model.generate(input_ids=prompt, **kw)
    exp = ref.generate(input_ids=prompt, **kw)
    assert out.shape == (1, SEQ + 4)
    assert torch.equal(out, exp)
    assert len(fused_calls) == 4 * len(lora_layers(model))


def test_fp16_base_fp32_adapters(device, fused_calls):
    """PEFT's default autocast_adapter_dtype: fp32 adapters over a 16-bit base."""
    model, ref = peft_pair("llama", dtype=torch.float16, device=device)
    layer = next(iter(lora_layers(model).values()))
    assert layer.base_layer.weight.dtype == torch.float16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    patch(model)
    x = ids(device)
    out, exp = model(x).logits, ref(x).logits
    assert out.dtype == exp.dtype == torch.float16
    assert len(fused_calls) == len(lora_layers(model))
    assert_close(out, exp, tol=1e-2, what="logits")
    out.float().sum().backward()
    exp.float().sum().backward()
    assert_grads_close(model, ref, tol=3e-2)


@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
def test_bf16_base(adapter_dtype, device, monkeypatch, fused_calls):
    if not CUDA:  # the Triton interpreter's bf16 tl.dot is unreliable: reference backend
        monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    model = tiny_model("llama", dtype=torch.bfloat16)
    model = get_peft_model(model, lora_config(), autocast_adapter_dtype=adapter_dtype == "fp32").to(device)
    ref = copy.deepcopy(model)
    want = torch.float32 if adapter_dtype == "fp32" else torch.bfloat16
    assert next(iter(lora_layers(model).values())).lora_A["default"].weight.dtype == want
    patch(model)
    x = ids(device)
    out, exp = model(x).logits, ref(x).logits
    assert out.dtype == torch.bfloat16
    assert len(fused_calls) == len(lora_layers(model))
    assert_close(out, exp, tol=3e-2, what="logits")


def test_autocast(device, monkeypatch, fused_calls):
    if not CUDA:
        monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    model, ref = peft_pair("qwen2", device=device)
    patch(model)
    x = ids(device)
    dev = torch.device(device).type
    with torch.autocast(dev, dtype=torch.bfloat16):
        out, exp = model(x).logits, ref(x).logits
    assert out.dtype == exp.dtype
    assert len(fused_calls) == len(lora_layers(model))
    assert_close(out, exp, tol=3e-2, what="logits")
    out.float().sum().backward()
    exp.float().sum().backward()
    assert_grads_close(model, ref, tol=5e-2)


# ------------------------------------------------------------------- PEFT state & API

def test_report_lists_every_lora_layer(device, caplog):
    model, _ = peft_pair("qwen2", layers=2, device=device)
    with caplog.at_level(logging.INFO, logger="fastlora.peft"):
        report = patch(model, verbose=True)
    assert isinstance(report, PatchReport)
    names = set(lora_layers(model))
    assert {e.name for e in report} == names and len(names) == 14
    assert set(report.patched) == names and report.not_patched == {}
    text = str(report)
    assert "14 of 14" in text
    for name in names:
        assert name in text
    assert "14 of 14" in caplog.text and "q_proj" in caplog.text


def test_unpatch_restores_classes(device, fused_calls):
    model, ref = peft_pair("llama", device=device)
    before = {n: type(m) for n, m in model.named_modules()}
    patch(model)
    assert all(is_patched(m) for m in lora_layers(model).values())
    assert all(isinstance(m, PeftLinear) for m in lora_layers(model).values())
    restored = unpatch(model)
    assert set(restored) == set(lora_layers(model))
    assert {n: type(m) for n, m in model.named_modules()} == before
    model(ids(device))
    assert fused_calls == []
    assert unpatch(model) == []


def test_patch_twice_and_new_targets(device, fused_calls):
    model, ref = peft_pair("llama", device=device, target_modules=["q_proj"])
    patch(model)
    report = patch(model)
    assert len(report.patched) == 1 and "already patched" in report.layers[0].notes
    cfg = lora_config(target_modules=["v_proj"])
    add_adapter((model, ref), "other", cfg)
    assert not is_patched(model.base_model.model.model.layers[0].self_attn.v_proj)
    report = patch(model)
    assert len(report.patched) == 2
    for m in (model, ref):
        m.base_model.set_adapter(["default", "other"])
    x = ids(device)
    assert_close(model(x).logits, ref(x).logits, what="logits")
    assert len(fused_calls) == 2


def test_state_dict_and_save_pretrained_roundtrip(device, tmp_path):
    model, ref = peft_pair("gpt2", device=device)
    patch(model)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.save_pretrained(tmp_path)
    # stock PEFT, fresh base model with the same (seeded) weights
    loaded = PeftModel.from_pretrained(tiny_model("gpt2").to(device), tmp_path)
    assert not any(is_patched(m) for m in loaded.modules())
    model.eval()
    loaded.eval()
    x = ids(device)
    assert_close(model(x).logits, loaded(x).logits, what="logits")
    # and a patched model loads it too
    loaded2 = PeftModel.from_pretrained(tiny_model("gpt2").to(device), tmp_path)
    patch(loaded2)
    assert_close(loaded2(x).logits, loaded(x).logits, what="logits")


def test_deepcopy_and_pickle(device, fused_calls):
    model, ref = peft_pair("llama", device=device)
    patch(model)
    x = ids(device)
    exp = ref(x).logits
    buf = io.BytesIO()
    torch.save(model, buf)  # whole-model pickle (protocol 2)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), loaded):
        assert all(is_patched(m) for m in lora_layers(clone).values())
        fused_calls.clear()
        assert_close(clone(x).logits, exp, what="logits")
        assert len(fused_calls) == len(lora_layers(clone))


def test_multiple_active_adapters_stacked(device, fused_calls):
    model, ref = peft_pair("llama", device=device)
    cfg = lora_config(r=8, lora_alpha=32, use_rslora=True)
    add_adapter((model, ref), "b", cfg)
    for m in (model, ref):
        m.base_model.set_adapter(["default", "b"])
    patch(model)
    x = ids(device)
    out, exp = model(x, labels=x), ref(x, labels=x)
    n = len(lora_layers(model))
    assert len(fused_calls) == n, "no dropout, one dtype: one fused call per layer"
    assert all(c["lora_A"].shape[0] == 12 and c["scaling"] == 1.0 for c in fused_calls)
    assert_close(out.logits, exp.logits, what="logits")
    out.loss.backward()
    exp.loss.backward()
    assert_grads_close(model, ref)
    assert any("lora_A.b" in k for k in lora_grads(model))


def _single_layer(device, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 40)).to(dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False, **kw)
    model = get_peft_model(net, cfg).to(device)
    return model, copy.deepcopy(model)


def test_multiple_adapters_with_dropout_independent_masks(device, fused_calls):
    """Dropout on a further adapter: PEFT's own nn.Dropout (same RNG draws as PEFT)."""
    model, ref = _single_layer(device, lora_dropout=0.0)
    cfg_b = LoraConfig(r=8, lora_alpha=4, target_modules=["0"], init_lora_weights=False,
                       lora_dropout=0.5)
    add_adapter((model, ref), "b", cfg_b)
    for m in (model, ref):
        m.base_model.set_adapter(["default", "b"])
        m.train()
    patch(model)
    x = torch.randn(5, 32, device=device)
    torch.manual_seed(123)
    out = model(x)
    torch.manual_seed(123)
    exp = ref(x)
    assert len(fused_calls) == 1 and fused_calls[0]["lora_A"].shape[0] == 4
    assert_close(out, exp, what="output")
    with torch.no_grad():  # the dropout really ran: eval mode gives something else
        ref.eval()
        assert rel_err(ref(x), exp) > 1e-3


def test_mixed_adapter_dtypes(device, fused_calls):
    model, ref = _single_layer(device)
    cfg_b = LoraConfig(r=8, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    add_adapter((model, ref), "b", cfg_b)
    for m in (model, ref):
        layer = m.base_model.model[0]
        layer.lora_A["b"].to(torch.float16)
        layer.lora_B["b"].to(torch.float16)
        m.base_model.set_adapter(["default", "b"])
    patch(model)
    x = torch.randn(5, 32, device=device)
    out, exp = model(x), ref(x)
    assert len(fused_calls) == 1
    assert out.dtype == exp.dtype == torch.float32
    assert_close(out, exp, what="output")


def test_disabled_adapter_context(device, fused_calls):
    model, ref = peft_pair("llama", device=device)
    patch(model)
    x = ids(device)
    with model.disable_adapter():
        out = model(x).logits
    with ref.disable_adapter():
        exp = ref(x).logits
    assert fused_calls == []
    assert_close(out, exp, what="logits")
    assert rel_err(ref(x).logits, exp) > 1e-3, "the adapter must change the output"
    model(x)
    assert len(fused_calls) == len(lora_layers(model))


def test_merged_state(device, fused_calls):
    model, ref = peft_pair("llama", device=device)
    patch(model)
    x = ids(device)
    exp = ref(x).logits
    model.base_model.merge_adapter()
    report = patch(model)
    assert all(any("merged" in n for n in e.notes) for e in report)
    assert_close(model(x).logits, exp, tol=1e-4 if not CUDA else MODEL_TOL, what="merged logits")
    assert fused_calls == []
    model.base_model.unmerge_adapter()
    assert_close(model(x).logits, exp, what="unmerged logits")
    assert len(fused_calls) == len(lora_layers(model))
    merged = model.merge_and_unload()
    assert not lora_layers(merged)
    assert_close(merged(x).logits, exp, what="merge_and_unload logits")


def test_rslora_rank_and_alpha_patterns(device, fused_calls):
    cfg = lora_config(use_rslora=True, rank_pattern={"q_proj": 8, "down_proj": 2},
                      alpha_pattern={"v_proj": 32})
    model, ref = peft_pair("llama", device=device, config=cfg)
    patch(model)
    x = ids(device)
    out, exp = model(x, labels=x), ref(x, labels=x)
    attn = model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.r["default"] == 8 and attn.v_proj.scaling["default"] == 16.0
    seen = {(c["lora_A"].shape[0], c["scaling"]) for c in fused_calls}
    assert (8, 8 / 8 ** 0.5) in seen and (4, 32 / 2) in seen and (2, 8 / 2 ** 0.5) in seen
    assert_close(out.logits, exp.logits, what="logits")
    out.loss.backward()
    exp.loss.backward()
    assert_grads_close(model, ref)


def test_scaling_is_read_per_call(device, fused_calls):
    from peft.helpers import rescale_adapter_scale
    model, ref = peft_pair("llama", device=device)
    patch(model)
    x = ids(device)
    with rescale_adapter_scale(model, 0.25), rescale_adapter_scale(ref, 0.25):
        out, exp = model(x).logits, ref(x).logits
    assert_close(out, exp, what="rescaled logits")
    assert rel_err(ref(x).logits, exp) > 1e-3


def test_set_and_delete_adapter(device, fused_calls):
    model, ref = peft_pair("llama", device=device)
    patch(model)
    add_adapter((model, ref), "b", lora_config(r=2, lora_alpha=2))
    for m in (model, ref):
        m.set_adapter("b")
    x = ids(device)
    assert_close(model(x).logits, ref(x).logits, what="adapter b")
    assert all(c["lora_A"].shape[0] == 2 for c in fused_calls)
    for m in (model, ref):
        m.set_adapter("default")
        m.delete_adapter("b")
    assert all("b" not in m.lora_A for m in lora_layers(model).values())
    assert_close(model(x).logits, ref(x).logits, what="after delete")


def test_adapter_names_mixed_batch_is_fused(device, fused_calls, monkeypatch):
    model, ref = peft_pair("llama", device=device)
    add_adapter((model, ref), "b", lora_config(r=2))
    for m in (model, ref):
        m.eval()
    patch(model)
    mixed = []
    real = PATCH_MODULE.peft_mixed_batch_forward
    monkeypatch.setattr(PATCH_MODULE, "peft_mixed_batch_forward",
                        lambda *a, **kw: mixed.append(a[2]) or real(*a, **kw))
    x = torch.cat([ids(device, seed) for seed in (1, 2)])[:3]  # 3 sequences
    names = ["default", "b", "__base__"]
    out, exp = model(x, adapter_names=names).logits, ref(x, adapter_names=names).logits
    assert fused_calls == [] and len(mixed) == len(lora_layers(model))
    assert_close(out, exp, what="mixed batch")
    with pytest.raises(ValueError):
        model(x, adapter_names=["default", "nope", "b"])
    kw = dict(max_new_tokens=3, do_sample=False, adapter_names=names)
    assert torch.equal(model.generate(input_ids=x, **kw), ref.generate(input_ids=x, **kw))


@pytest.mark.parametrize("kind", ["torch", "accelerate"])
def test_hooks_added_after_patch_fall_back(kind, device, fused_calls):
    """A hook on the base layer (DeepSpeed, accelerate offload, user) must still run."""
    model, ref = _single_layer(device)
    patch(model)
    seen = []
    base = model.base_model.model[0].base_layer
    if kind == "torch":
        base.register_forward_pre_hook(lambda mod, args: seen.append(1))
    else:  # accelerate replaces the module's forward in its instance dict
        hooks = pytest.importorskip("accelerate.hooks")

        class Spy(hooks.ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                seen.append(1)
                return args, kwargs

        hooks.add_hook_to_module(base, Spy())
    x = torch.randn(3, 32, device=device)
    assert_close(model(x), ref(x), what="output")
    assert seen == [1] and fused_calls == []
    report = patch(model)
    assert not report.patched and "hook" in report.layers[0].reason


def test_input_dtype_casting_disabled(device, fused_calls):
    from peft.helpers import disable_input_dtype_casting
    model, ref = _single_layer(device, dtype=torch.float16)
    patch(model)
    x = torch.randn(3, 32, device=device, dtype=torch.float16)
    assert_close(model(x), ref(x), tol=1e-2, what="cast enabled")
    assert len(fused_calls) == 1
    # fp16 input, fp32 adapter, no cast: PEFT raises, and so must the patched layer
    with disable_input_dtype_casting(ref), pytest.raises(RuntimeError):
        ref(x)
    with disable_input_dtype_casting(model), pytest.raises(RuntimeError):
        model(x)
    assert len(fused_calls) == 1


# -------------------------------------------------------------- what is not patched

def test_embedding_and_unsupported_base(device, fused_calls):
    model, ref = peft_pair("llama", device=device, target_modules=["q_proj", "k_proj"])
    add_adapter((model, ref), "emb", lora_config(target_modules=["embed_tokens", "v_proj"]))
    for m in (model, ref):
        m.base_model.set_adapter(["default", "emb"])
    report = patch(model)
    why = report.not_patched
    assert set(why) == {"base_model.model.model.embed_tokens"}
    assert "embedding" in why["base_model.model.model.embed_tokens"].lower()
    assert len(report.patched) == 3
    x = ids(device)
    assert_close(model(x).logits, ref(x).logits, what="logits")
    assert len(fused_calls) == 3

    class OddLinear(nn.Linear):  # e.g. a quantized base overriding forward
        def forward(self, x):
            return super().forward(x) * 1.0

    layer_model, _ = _single_layer(device)
    assert patch(layer_model).all_patched
    layer = layer_model.base_model.model[0]
    odd = OddLinear(32, 40).to(device)
    odd.load_state_dict(layer.base_layer.state_dict())
    layer.base_layer = odd
    report = patch(layer_model)  # re-patching restores what became unsupported
    assert "not a plain nn.Linear" in report.layers[0].reason
    assert not is_patched(layer)


def test_no_lora_layers_raises():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        patch(tiny_model("llama"))
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        patch(nn.Linear(4, 4))


def test_unknown_adapter_name_raises(device):
    model, _ = _single_layer(device)
    with pytest.raises(ValueError, match="unknown adapter"):
        patch(model, adapters=["nope"])
    assert not is_patched(model.base_model.model[0])


def test_single_layer_and_injected_adapter(device, fused_calls):
    """A plain model holding LoRA layers (no PeftModel: what transformers' add_adapter
    does through peft.inject_adapter_in_model), and a single layer."""
    from peft import inject_adapter_in_model
    model = inject_adapter_in_model(lora_config(), tiny_model("qwen2")).to(device)
    ref = copy.deepcopy(model)
    layer = model.model.layers[0].self_attn.q_proj
    report = patch(layer)
    assert report.patched == ["Linear"] and is_patched(layer)
    assert not is_patched(model.model.layers[0].self_attn.k_proj)
    assert len(patch(model).patched) == len(lora_layers(model))
    x = ids(device)
    assert_close(model(x).logits, ref(x).logits, what="logits")
    assert len(fused_calls) == len(lora_layers(model))


# ------------------------------------------------------------------------ torch.compile

def _capturing_aot_eager(graphs: list):
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def capture(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return capture


def _fused_nodes(gm) -> int:
    return sum("fastlora.lora_linear_fwd" in str(n.target) for n in gm.graph.nodes
               if n.op == "call_function")


def test_compile_whole_model_fullgraph(device):
    model, ref = peft_pair("llama", device=device)
    patch(model)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_capturing_aot_eager(graphs), fullgraph=True)
    x = ids(device)
    out = compiled(input_ids=x, labels=x)
    assert len(graphs) == 1
    if backend.choose(x.float()) == "triton":
        assert _fused_nodes(graphs[0]) == len(lora_layers(model))
    exp = ref(input_ids=x, labels=x)
    assert_close(out.logits, exp.logits, what="logits")
    out.loss.backward()
    exp.loss.backward()
    assert_grads_close(model, ref)
    torch._dynamo.reset()


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_compile_single_layer_fullgraph(dropout, device):
    model, ref = _single_layer(device, lora_dropout=dropout)
    layer = model.base_model.model[0]
    patch(layer)
    layer.train(dropout > 0)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=_capturing_aot_eager(graphs), fullgraph=True)
    x = torch.randn(6, 32, device=device, requires_grad=True)
    y = compiled(x)
    assert len(graphs) == 1
    if backend.choose(x) == "triton":
        assert _fused_nodes(graphs[0]) == 1
    y.sum().backward()
    if dropout == 0.0:
        x2 = x.detach().clone().requires_grad_(True)
        exp = ref.base_model.model[0](x2)
        exp.sum().backward()
        assert_close(y, exp, what="output")
        assert_close(x.grad, x2.grad, what="dx")
        gl = layer.lora_A["default"].weight.grad
        assert_close(gl, ref.base_model.model[0].lora_A["default"].weight.grad, what="dA")
    else:  # dropout active: differs from eval, and the LoRA grads exist
        with torch.no_grad():
            layer.eval()
            assert rel_err(layer(x), y) > 1e-4
        assert layer.lora_A["default"].weight.grad.abs().max() > 0


def test_adapter_names_mixed_batch_trains(device):
    """PEFT refuses adapter_names in training mode; a patched model trains a mixed batch,
    each sequence's gradient reaching its own adapter only."""
    model, ref = peft_pair("llama", device=device)
    add_adapter((model, ref), "b", lora_config(r=2))
    patch(model)
    for n, p in model.named_parameters():  # add_adapter leaves a new adapter frozen
        p.requires_grad_("lora_" in n)
    x = ids(device)
    names = ["b", "__base__"]
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        ref.train()(x, adapter_names=names)
    out = model(x, adapter_names=names, labels=x)
    assert_close(out.logits, ref.eval()(x, adapter_names=names).logits, what="train-mode logits")
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".default." in n)
    assert all(g is not None and g.abs().max() > 0 for n, g in grads.items() if ".b." in n)
    assert model.base_model.training  # the tuner's flag is restored
