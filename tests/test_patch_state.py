"""What ``fastlora.patch`` adds to a model and what ``unpatch`` takes back: one reader
decides for every path (plain, mixed batch, patch time), one state object per layer, PEFT's
class names."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastlora.peft import is_patched, patch, unpatch  # noqa: E402
from helpers import assert_close  # noqa: E402
from peft_models import add_adapter, ids, lora_config, lora_layers, peft_pair  # noqa: E402

NAMES = ["default", "b"]


def two_adapters(device, **kw):
    model, ref = peft_pair("llama", device=device, **kw)
    add_adapter((model, ref), "b", lora_config(r=2, **kw))
    return model.eval(), ref.eval()


def test_accelerate_hook_runs_in_a_mixed_batch(device):
    """A hook accelerate adds to a base layer after patching (it replaces the module's
    forward) must run for adapter_names batches as for plain ones."""
    hooks = pytest.importorskip("accelerate.hooks")
    model, ref = two_adapters(device)
    patch(model)
    seen = []

    class Spy(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(1)
            return args, kwargs

    q_proj = lora_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    hooks.add_hook_to_module(q_proj.base_layer, Spy())
    x = ids(device)
    with torch.no_grad():
        assert_close(model(x, adapter_names=NAMES).logits, ref(x, adapter_names=NAMES).logits,
                     what="mixed batch")
        assert seen == [1]
        assert_close(model(x).logits, ref(x).logits, what="plain")
    assert seen == [1, 1]


def test_unpatch_leaves_nothing_behind(device):
    model, _ = two_adapters(device, use_dora=True)
    unpatched = pickle.dumps(model)
    patch(model)
    x = ids(device)
    with torch.no_grad():  # fill every cache: DoRA norms, the mixed-batch bank
        model(x)
        model(x, adapter_names=NAMES)
    model.train()
    model(x, adapter_names=NAMES).logits.sum().backward()
    model.eval()
    model.zero_grad(set_to_none=True)
    assert len(pickle.dumps(model)) < len(unpatched) + 4096  # patched: states pickle empty
    unpatch(model)
    assert not any(is_patched(m) for m in model.modules())
    assert not [(n, k) for n, m in model.named_modules() for k in vars(m) if "fastlora" in k]
    assert len(pickle.dumps(model)) == len(unpatched)


def test_class_name_and_repr_are_peft_s(device):
    model, ref = peft_pair("llama", device=device)
    patch(model)
    assert repr(model) == repr(ref)
    layer = next(iter(lora_layers(model).values()))
    assert type(layer).__name__ == "Linear" and repr(layer).startswith("lora.Linear(")
    assert type(model.base_model).__name__ == "LoraModel"
    assert type(copy.deepcopy(layer)).__name__ == "Linear"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickled_patched_layer_starts_with_empty_caches(protocol, device):
    from peft import LoraConfig, get_peft_model

    from fastlora.peft.state import ATTR

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 12)), LoraConfig(
        r=2, target_modules=["0"], init_lora_weights=False, use_dora=True)).to(device).eval()
    ref = copy.deepcopy(model)
    patch(model)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        model(x)  # a cached norm
        clone = pickle.loads(pickle.dumps(model, protocol=protocol))
        state = vars(clone.base_model.model[0])[ATTR]
        assert not state.norms._entries and state.bank is None
        assert_close(clone(x), ref(x), what="unpickled")
        assert state.norms._entries
