"""fastlora.vllm without vLLM (these run in CI): the entry point imports without vLLM and does
nothing unless switched on, the version gate, and the vLLM-free parts of the integration
(vLLM's stacked LoRA weights held as a PackedAdapters bank, the per-step routing) against
vLLM's LoRA semantics written out in float64 here. ``test_vllm_ops.py`` checks the same
bank against vLLM's own ops, ``test_vllm_engine.py`` the whole engine."""
import importlib.metadata
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from data import generator, randint, randn
from fastlora import multi_lora_linear
from fastlora.adapters.routing import Routing
from fastlora.vllm import plugin, version
from fastlora.vllm.stacked import StackedAdapters
from fastlora.vllm.step import StepRouting
from helpers import assert_close
from vllm_semantics import SLICES, fill, vllm_lora_linear

K = 40


def test_entry_point_is_registered():
    (ep,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
             if e.name == plugin.NAME]
    assert ep.value == "fastlora.vllm:register"


BLOCK_VLLM = "import sys; sys.modules['vllm'] = None\n"  # `import vllm` now raises ImportError


@pytest.mark.parametrize("env", [{}, {"FASTLORA_VLLM": "0"}, {"VLLM_PLUGINS": "other,plugin"},
                                 {"FASTLORA_VLLM": "0", "VLLM_PLUGINS": "fastlora"}])
def test_entry_point_loads_and_does_nothing_when_off(env):
    """Loaded as vLLM loads it, in a process where vLLM cannot be imported: switched off, it
    neither fails nor imports vLLM."""
    code = BLOCK_VLLM + (
        "import importlib.metadata\n"
        "(ep,) = [e for e in importlib.metadata.entry_points(group='vllm.general_plugins') "
        "if e.name == 'fastlora']\n"
        "ep.load()()\n"
        "assert sys.modules['vllm'] is None\n"
        "print('ok')\n")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("FASTLORA_VLLM", "VLLM_PLUGINS")}
    out = subprocess.run([sys.executable, "-c", code], env={**environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_entry_point_switched_on_needs_vllm():
    """On without vLLM importable: the import error surfaces (vLLM itself calls the entry
    point, so this only happens when someone calls it by hand)."""
    code = BLOCK_VLLM + "from fastlora.vllm import register\nregister()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTLORA_VLLM": "1"}, timeout=300)
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr


@pytest.mark.parametrize("env, on", [
    ({}, False), ({"FASTLORA_VLLM": "1"}, True), ({"FASTLORA_VLLM": "0"}, False),
    ({"FASTLORA_VLLM": " 1 "}, True), ({"VLLM_PLUGINS": "fastlora"}, True),
    ({"VLLM_PLUGINS": "a, fastlora"}, True), ({"VLLM_PLUGINS": "fastlora_x"}, False),
    ({"VLLM_PLUGINS": ""}, False), ({"FASTLORA_VLLM": "0", "VLLM_PLUGINS": "fastlora"}, False),
    ({"FASTLORA_VLLM": "1", "VLLM_PLUGINS": "other"}, True)])
def test_switch(env, on):
    assert plugin.active(env) is on


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_switch_rejects_other_values(value):
    with pytest.raises(ValueError, match="FASTLORA_VLLM"):
        plugin.active({"FASTLORA_VLLM": value})


@pytest.mark.parametrize("v, parsed", [("0.32.0", (0, 32, 0)), ("0.32.1.dev3+gabc", (0, 32, 1)),
                                       ("0.32.0+cpu", (0, 32, 0)), ("v0.33", (0, 33, 0)),
                                       ("1.0.0rc1", (1, 0, 0))])
def test_version_parse(v, parsed):
    assert version.parse(v) == parsed


@pytest.mark.parametrize("v, ok", [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.4", True),
                                   ("0.32.1.dev7+g1234", True), ("0.31.9", False),
                                   ("0.33.0", False), ("0.33.0rc1", False), ("1.32.0", False),
                                   ("dev", False), ("", False)])
def test_version_gate(v, ok):
    why = version.unsupported(v)
    assert (why is None) is ok
    if not ok:
        assert repr(v) in why or "outside" in why


def test_outside_the_tested_range_warns_once_and_changes_nothing(monkeypatch, caplog):
    """A vLLM of another version: one warning naming the tested versions; the hooks are never
    installed (vLLM stays untouched)."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.40.1"))
    hooks = types.ModuleType("fastlora.vllm.hooks")
    hooks.install = lambda: pytest.fail("hooks installed for an untested vLLM")
    monkeypatch.setitem(sys.modules, "fastlora.vllm.hooks", hooks)
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv("FASTLORA_VLLM", "1")
    with caplog.at_level(logging.WARNING, logger="vllm.fastlora"):
        plugin.register()
        plugin.register()
    assert len(caplog.records) == 1
    assert "0.40.1" in caplog.text and version.TESTED in caplog.text


# ---------------------------------------------------------------- the bank, vLLM's layout


@pytest.mark.parametrize("layer", list(SLICES))
def test_bank_matches_vllm_semantics(layer, device, multi_path):
    """Ragged ranks padded to vLLM's largest rank, an empty slot, -1 rows, several slices:
    fastlora's op on the bank gives vLLM's LoRA linear."""
    slices, rank, ranks = SLICES[layer], 16, [4, 16, 0, 8]
    g = generator(11)
    stacked = StackedAdapters(len(ranks), rank, K, slices, torch.float32, device)
    fill(stacked, ranks, g, device)
    m = 23
    x = randn(m, K, g=g, device=device)
    weight = randn(sum(slices), K, g=g, device=device, scale=K ** -0.5)
    bias = randn(sum(slices), g=g, device=device)
    index = randint(-1, len(ranks), (m,), g=g, device=device)
    index[:len(ranks) + 1] = torch.arange(-1, len(ranks))  # every slot and the base present
    got = multi_lora_linear(x, weight, bias, stacked.bank, Routing.from_index(index, len(ranks)))
    args = (x, weight, bias, stacked.lora_a_stacked, stacked.lora_b_stacked)
    ref = vllm_lora_linear(*[t.double() for t in args[:3]],
                           [t.double() for t in args[3]], [t.double() for t in args[4]], index)
    terms = vllm_lora_linear(*[t.double().abs() for t in args[:3]],
                             [t.double().abs() for t in args[3]],
                             [t.double().abs() for t in args[4]], index)
    assert_close(got, ref, torch.float32, layer, terms=terms)


def test_bank_ranks_skip_vllms_padding():
    """A slot's rank stops after its last non-zero A row: the rank itself for one slice, the
    last slice's offset plus its rank for merged slices; 0 for an empty or cleared slot."""
    g = generator(12)
    one = StackedAdapters(3, 16, K, [8], torch.float32, "cpu")
    fill(one, [4, 0, 16], g, "cpu")
    assert one.bank.ranks.tolist() == [4, 0, 16]
    qkv = StackedAdapters(2, 8, K, [8, 4, 4], torch.float32, "cpu")
    fill(qkv, [3, 8], g, "cpu")
    assert qkv.bank.ranks.tolist() == [2 * 8 + 3, 24] and qkv.bank.max_rank == 24
    qkv.lora_a_stacked[2][0].zero_()  # vLLM's reset_lora zeroes every slice of a slot
    qkv.refresh(0)
    assert qkv.bank.ranks.tolist() == [8 + 3, 24]


def test_bank_views_write_the_packed_block_diagonal():
    """vLLM's writes land in the packed bank, each slice's B in its own columns only."""
    stacked = StackedAdapters(2, 4, K, [6, 2, 2], torch.float32, "cpu")
    stacked.lora_b_stacked[1][1, 0] = 7.0
    rows = stacked.bank.B[1 * 12 + 4:1 * 12 + 8]  # slot 1, slice 1
    assert (rows[:, 6:8] == 7).all() and (rows[:, :6] == 0).all() and (rows[:, 8:] == 0).all()
    assert stacked.bank.B.count_nonzero() == 8
    stacked.lora_a_stacked[0][0, 0, 1] = 1.0
    assert stacked.bank.A[1].eq(1).all() and stacked.bank.A.count_nonzero() == K


def test_bank_like_copies_and_checks_vllms_tensors():
    a = [torch.zeros(2, 1, 4, K) for _ in range(2)]
    b = [torch.zeros(2, 1, n, 4) for n in (6, 6)]
    a[1][1, 0, :2] = 1.0
    stacked = StackedAdapters.like(a, b)
    assert torch.equal(stacked.lora_a_stacked[1], a[1]) and stacked.bank.ranks.tolist() == [0, 6]
    with pytest.raises(ValueError, match="one tensor per slice"):
        StackedAdapters.like(a, b[:1])
    with pytest.raises(ValueError, match=r"\[n, 1, R, K\]"):
        StackedAdapters.like(a, [torch.zeros(2, 1, 6, 8), b[1]])


def test_bank_rejects_empty_shapes():
    with pytest.raises(ValueError, match="slots, rank and slice widths"):
        StackedAdapters(2, 0, K, [4], torch.float32, "cpu")


# ---------------------------------------------------------------- the step's routing


def test_step_routing_per_scheduled_token():
    step = StepRouting(3)
    assert step.routing(5) is None  # before vLLM's first mapping: no adapter
    step.update(torch.tensor([0, -1, 2, 2, 1]), any_adapter=True)
    assert step.routing(5).index.tolist() == [0, -1, 2, 2, 1]
    assert step.routing(5) is step.routing(5)
    padded = step.routing(8)  # vLLM padded the batch: the padding rows get the base
    assert padded.index.tolist() == [0, -1, 2, 2, 1, -1, -1, -1] and step.routing(8) is padded
    with pytest.raises(ValueError, match="fewer than the 5 tokens"):
        step.routing(4)
    step.update(torch.tensor([-1, -1]), any_adapter=False)
    assert step.routing(2) is None and step.routing(9) is None


def test_step_routing_checks_slots():
    with pytest.raises(ValueError, match="outside -1 .. 2"):
        StepRouting(3).update(torch.tensor([0, 3]), any_adapter=True)
