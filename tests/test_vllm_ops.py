"""Conformance of fastlora.vllm with the installed vLLM (marker ``vllm``; skipped without
vLLM, and for a vLLM outside the tested range, where the plugin changes nothing): the private
integration points exist with the signatures the plugin relies on, and fastlora's op on the
bank (``StackedAdapters``) and the step's routing (``StepRouting``, fed by vLLM's own punica
wrapper) gives what vLLM's own shrink and expand give, on random metadata: ragged ranks
padded by vLLM, -1 rows, several slices."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

from data import generator, randint, randn
from fastlora import multi_lora_linear
from fastlora.vllm import version
from fastlora.vllm.layers import _step_of
from fastlora.vllm.stacked import StackedAdapters
from helpers import assert_close
from vllm_semantics import SLICES, fill, vllm_lora_linear

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(version.unsupported(vllm.__version__) is not None,
                                 reason=f"vLLM {vllm.__version__} is outside the tested range "
                                        f"({version.TESTED}): the plugin leaves it untouched")]

K = 40


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_integration_points():
    """What fastlora.vllm.hooks and fastlora.vllm.layers call or replace, as they use it."""
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    from fastlora.vllm.layers import _fused_classes

    assert params(BaseLinearLayerWithLoRA._apply_sync) == ["self", "x", "bias"]
    assert params(BaseLinearLayerWithLoRA.set_lora)[:2] == ["self", "index"]
    assert params(BaseLinearLayerWithLoRA.reset_lora) == ["self", "index"]
    assert params(BaseLinearLayerWithLoRA._get_quant_method) == ["self"]
    assert params(PunicaWrapperBase.update_metadata)[:2] == ["self", "mapping"]
    assert isinstance(PunicaWrapperBase.token_lora_indices, property)
    assert params(LoRAModelManager._create_lora_modules) == ["self"]
    assert isinstance(LoRAModelManager.lora_slots, property)
    assert params(layer_utils.dispatch_cpu_unquantized_gemm) == ["layer", "remove_weight"]
    for cls in _fused_classes():  # each reaches _apply_sync (none overrides it or the stacking)
        assert issubclass(cls, BaseLinearLayerWithLoRA)
        assert cls._apply_sync is BaseLinearLayerWithLoRA._apply_sync, cls


def punica(tokens: int, seqs: int):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    return PunicaWrapperCPU(tokens, seqs, "cpu")


def mapping(token_slots: list[int], seqs: int):
    """vLLM's LoRAMapping of slots (LoRA id = slot + 1, 0: none), as its model runner makes
    one (is_prefill: the CPU runner always uses the segment kernels)."""
    from vllm.lora.layers import LoRAMapping

    ids = tuple(s + 1 for s in token_slots)
    return LoRAMapping(ids, ids[:seqs], is_prefill=True)


@pytest.mark.parametrize("layer", list(SLICES))
def test_fused_op_matches_vllms_shrink_and_expand(layer, multi_path):
    """vLLM's own punica wrapper (its CPU ops) on the same stacked weights and metadata. Its
    CPU ops index the weights with -1 (so a -1 row gets the last slot's adapter; upstream
    knows): on -1 rows the expectation is the base layer, as vLLM's GPU kernels do."""
    slices, rank, ranks = SLICES[layer], 16, [4, 16, 0, 8]
    g = generator(21)
    stacked = StackedAdapters(len(ranks), rank, K, slices, torch.float32, "cpu")
    fill(stacked, ranks, g, "cpu")
    m = 29
    x = randn(m, K, g=g)
    weight = randn(sum(slices), K, g=g, scale=K ** -0.5)
    bias = randn(sum(slices), g=g)
    slots = randint(-1, len(ranks), (m,), g=g)
    slots[:len(ranks) + 1] = torch.arange(-1, len(ranks))
    wrapper = punica(64, m)  # random slots: up to one segment per token
    step = _step_of(wrapper, len(ranks))
    wrapper.update_metadata(mapping(slots.tolist(), m), list(range(1, len(ranks) + 1)),
                            len(ranks) + 1, 256)
    assert torch.equal(step.routing(m).index.long(), slots)  # the routing is vLLM's mapping

    got = multi_lora_linear(x, weight, bias, stacked.bank, step.routing(m))
    theirs = x @ weight.T + bias
    wrapper.add_lora_linear(theirs, x, stacked.lora_a_stacked, stacked.lora_b_stacked, 1.0,
                            tuple(slices))
    base = (x @ weight.T + bias)
    want = torch.where((slots >= 0)[:, None], theirs, base)
    args = (x, weight, bias, stacked.lora_a_stacked, stacked.lora_b_stacked)
    terms = vllm_lora_linear(*[t.double().abs() for t in args[:3]],
                             [t.double().abs() for t in args[3]],
                             [t.double().abs() for t in args[4]], slots)
    assert_close(got, want, torch.float32, layer, terms=terms)
    assert (got - base)[slots >= 0].abs().max() > 1e-2  # the adapters are there to compare


def test_step_routing_of_a_step_without_adapters():
    wrapper = punica(16, 4)
    step = _step_of(wrapper, 2)
    assert _step_of(wrapper, 2) is step  # one per wrapper
    wrapper.update_metadata(mapping([-1, -1, -1], 3), [1, 2], 3, 256)
    assert step.routing(3) is None
    wrapper.update_metadata(mapping([1, -1, 0], 3), [1, 2], 3, 256)
    assert step.routing(3).index.tolist() == [1, -1, 0]


SWITCH = """
import vllm.model_executor.layers.utils as layer_utils
from vllm.lora.model_manager import LoRAModelManager
from fastlora.vllm import register
before = (LoRAModelManager._create_lora_modules, layer_utils.dispatch_cpu_unquantized_gemm)
register()
after = (LoRAModelManager._create_lora_modules, layer_utils.dispatch_cpu_unquantized_gemm)
print("untouched" if after == before else "wrapped")
"""


@pytest.mark.parametrize("env, want", [({}, "untouched"), ({"FASTLORA_VLLM": "1"}, "wrapped")])
def test_register_wraps_vllm_only_when_on(env, want, tmp_path):
    """In a fresh process (cwd away from the checkout: transformers probes for a top-level
    ``kernels`` module, which a checkout on sys.path would shadow)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("FASTLORA_VLLM", "VLLM_PLUGINS")}
    out = subprocess.run([sys.executable, "-c", SWITCH], env={**environ, **env}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == want
