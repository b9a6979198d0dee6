"""A patched PEFT model trains under DDP and FSDP2 (``fully_shard``) exactly as the unpatched
one under the same wrapper: 2 processes, gloo on CPU (tests/distributed_worker.py runs each
rank). The fused ops run inside FSDP2's forward, where parameters are unsharded."""
from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("peft")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo needed", allow_module_level=True)

import distributed_worker  # noqa: E402
from helpers import assert_close  # noqa: E402

WORLD = 2
SCENARIOS = [("ddp", True), ("fsdp2", True), ("fsdp2", False)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every scenario on both ranks, in one start of the processes. Spawned, one thread each:
    a forked rank would inherit the parent's OpenMP thread pool (libgomp) in whatever state
    earlier tests left it and can freeze inside its first matrix product."""
    out = tmp_path_factory.mktemp("distributed")
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the spawned interpreters at start
    try:
        torch.multiprocessing.start_processes(
            distributed_worker.run, args=(WORLD, _free_port(), str(out), SCENARIOS), nprocs=WORLD,
            start_method="spawn")
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("how,patch_first", SCENARIOS,
                         ids=["ddp", "fsdp2-patch-then-shard", "fsdp2-shard-then-patch"])
def test_trains_like_peft_under_the_same_wrapper(how, patch_first, results):
    for rank, per_rank in enumerate(results):
        r = per_rank[(how, patch_first)]
        assert r["patched"] == r["total"] == 4
        assert r["fused"] == 4 * distributed_worker.STEPS, "every layer fused, every step"
        assert r["ref_losses"][-1] < r["ref_losses"][0], "the reference run must learn"
        for step, (a, b) in enumerate(zip(r["losses"], r["ref_losses"])):
            assert a == pytest.approx(b, rel=1e-4), f"rank {rank} step {step}"
        assert r["grads"].keys() == r["ref_grads"].keys() and len(r["grads"]) == 4 * 6
        for name, g in r["ref_grads"].items():
            assert g.abs().max() > 0, f"{name}: zero reference gradient"
            assert_close(r["grads"][name], g, what=f"rank {rank} {name}")
        sharded = how == "fsdp2" and not patch_first  # what the PatchReport says
        assert any("DTensor" in n and "FSDP2's forward" in n for n in r["notes"]) == sharded
        assert any("managed by FSDP" in n for n in r["notes"]) == sharded
