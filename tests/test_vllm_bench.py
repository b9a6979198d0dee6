"""bench/bench_vllm.py compares like with like (CPU, tiny): fastlora's op on the vLLM-shaped
bank, the PyTorch three-step baseline and, when vLLM is importable, vLLM's own punica
wrapper give the same layer; its dry run goes end to end. Runs without vLLM (CI)."""
import json

import pytest
import torch

from bench_vllm import has_vllm, main, make_impls, make_layer, token_slots
from data import generator, randn


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("use_vllm", [False, pytest.param(True, marks=pytest.mark.vllm)])
def test_benchmarked_implementations_agree(phase, use_vllm):
    if use_vllm and not has_vllm():
        pytest.skip("vLLM is not importable")
    weight, stacked = make_layer(32, [32, 16, 16], 4, [8, 16, 4, 2], torch.float32, "cpu")
    assert stacked.bank.ranks.tolist() == [2 * 16 + 8, 48, 2 * 16 + 4, 2 * 16 + 2]
    slots = token_slots(21, 3, phase == "prefill")
    assert set(slots.tolist()) == {0, 1, 2}
    if phase == "prefill":  # one contiguous request per active slot
        assert slots.tolist() == sorted(slots.tolist())
    impls = make_impls(weight, stacked, slots, use_vllm)
    assert set(impls) == {"F.linear", "fastlora", "vllm" if use_vllm else "torch-sgmv"}
    x = randn(21, 32, g=generator(0))
    with torch.no_grad():
        outs = {name: fn(x) for name, fn in impls.items()}
    assert (outs["fastlora"] - outs["F.linear"]).abs().max() > 1e-2  # adapters do something
    for name, out in outs.items():
        if name != "F.linear":
            torch.testing.assert_close(out, outs["fastlora"], atol=1e-4, rtol=1e-4, msg=name)


def test_dry_run(tmp_path):
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("vllm-cpu-dry-run-*.json")
    data = json.loads(path.read_text())
    assert data["complete"] and data["env"]["dry_run"]
    impls = {r["impl"] for r in data["rows"]}
    assert impls == {"F.linear", "fastlora", "vllm" if has_vllm() else "torch-sgmv"}
    assert {(r["layer"], r["phase"]) for r in data["rows"]} == {
        (layer, phase) for layer in ("qkv", "o_proj") for phase in ("decode", "prefill")}
    assert path.with_suffix(".md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there to measure on")
def test_exits_non_zero_when_nothing_is_measured(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path)])
    message = str(exit_.value.code)
    assert "no CUDA device" in message and "nothing was measured" in message
    assert not list(tmp_path.iterdir())
