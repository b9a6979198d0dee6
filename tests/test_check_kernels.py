"""The GPU-less kernel check: every kernel and autotune config compiles for sm_80/sm_90,
uses tensor cores and stays within the shared-memory limit and the spill budget,
including the fp32-adapter variants at torch's default "highest" matmul precision, and
the sm_90 TMA kernel (wgmma, no spills; skipped on sm_80); under the newest Triton and under
the GPU image's (3.6)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastlora.kernels.check import SMEM_LIMIT, SPILL_BUDGET, Row

_Q4_LABELS = ("4-bit forward", "4-bit dx", "4-bit DoRA forward", "4-bit DoRA dx",
              "4-bit W nested b64", "straddling")
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.timeout(1800)  # every kernel and config, twice: minutes on 2 cores
def test_check_kernels_passes_for_sm80_and_sm90():
    proc = subprocess.run([sys.executable, "-m", "fastlora", "check-kernels",
                           "--target", "sm_80", "--target", "sm_90"],
                          capture_output=True, text=True, env=ENV, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith("_")]
    assert lines[0] == f"compiling {len(rows)} kernel variants for sm_80, sm_90"
    lora = {"_lora_shrink_kernel", "_lora_linear_kernel", "_lora_dy_kernel", "_lora_da_kernel",
            "_dora_norm_kernel"}
    assert {line.split()[0] for line in rows} >= lora
    # one kernel per stage: the multi-adapter (MULTI) variants are rows of the same kernels
    variants = {(line.split()[0], line.split()[1]) for line in rows}
    for kernel, variant in [("_lora_shrink_kernel", "sorted"), ("_lora_shrink_kernel", "gather"),
                            ("_lora_linear_kernel", "multi"), ("_lora_dy_kernel", "sorted"),
                            ("_lora_da_kernel", "sorted")]:
        assert (kernel, variant) in variants, (kernel, variant)
    assert any(line.startswith("_lora_linear_kernel ") and "gather" in line for line in rows)
    # the gathered shrink multiplies on CUDA cores (no dot): no tensor cores required
    assert all(" - " in line for line in rows
               if line.startswith("_lora_shrink_kernel ") and line.split()[1] == "gather")
    # bitsandbytes 4-bit weights (QUANT4): the fused linear's forward (with the decode
    # configs) and dx pass, DoRA's forms, the row norm; a layout whose blocks straddle rows
    q4 = [line for line in rows if "4-bit" in line]
    assert {line.split()[0] for line in q4} == {"_lora_linear_kernel", "_dora_norm_kernel"}
    assert all(any(label in line for line in q4) for label in _Q4_LABELS)
    assert any("BLOCK_M=16," in line for line in q4 if "4-bit forward" in line)
    tma = [re.search(r" (sm_\d+) +\d+ +\d+ +(\d+) +(\S+) +(.+)$", line).groups()
           for line in rows if line.startswith("_lora_linear_tma_kernel ")]
    assert all(line.rstrip().endswith("ok") for line in rows if "_tma_" not in line)
    # fp32 adapters at the default precision: every LoRA kernel, as tf32x3
    assert {line.split()[0] for line in rows if "fp32" in line and "tf32x3" in line} >= (
        lora | {"_lora_linear_tma_kernel"})
    # the persistent TMA kernel: wgmma without spills on sm_90, skipped (not failed) on sm_80
    assert {target for target, *_ in tma} == {"sm_80", "sm_90"}
    for target, spill, mma, status in tma:
        if target == "sm_90":
            assert (spill, mma, status) == ("0", "wgmma", "ok")
        else:
            assert status == "skipped: built for sm_90 only"
    assert any("in place" in line and "tf32x3" in line for line in rows)
    assert any(" sm_90 " in line and "wgmma" in line for line in rows)
    assert lines[-2].startswith(f"summary: {len(rows)} compilations in ")
    assert f"budget {SPILL_BUDGET} B" in lines[-2]
    assert lines[-1] == f"{len(rows)} compilations, 0 failed"


IMAGE_TRITON = "3.6.0"  # the Triton of the lent GPU machines' image (torch 2.11)


def image_triton() -> dict:
    """The environment that runs Triton ``IMAGE_TRITON`` in place of the installed one: a
    folder ``pip install --target`` fills once (build/, ignored by git, kept between runs)
    put first on PYTHONPATH."""
    folder = Path(__file__).resolve().parents[1] / "build" / f"triton-{IMAGE_TRITON}"
    if not (folder / "triton" / "__init__.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(folder), f"triton=={IMAGE_TRITON}"], check=True, timeout=600)
    return {**ENV, "PYTHONPATH": os.pathsep.join(
        [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_check_kernels_passes_under_the_gpu_image_triton():
    """Triton 3.6 allocates registers differently (the multi-adapter dx tile that spilled
    128 B/thread on sm_80 there): every kernel and config compiles within the budgets under
    it too, for both targets."""
    env = image_triton()
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert version.stdout.strip() == IMAGE_TRITON, version.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "fastlora", "check-kernels", "--target", "sm_80",
                           "--target", "sm_90"], capture_output=True, text=True, env=env,
                          timeout=2400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[-1].endswith(" compilations, 0 failed")


@pytest.mark.parametrize("row, expect", [
    (Row("k", "v", "c", "sm_80", shared=SMEM_LIMIT[80] + 1, mma="mma.sync"), "shared memory"),
    (Row("k", "v", "c", "sm_90", shared=1024, mma=""), "tensor-core"),
    (Row("k", "v", "c", "sm_90", shared=1024, mma="wgmma", spill=SPILL_BUDGET + 8), "spills"),
    (Row("k", "v", "c", "sm_90", error="CompilationError: boom"), "boom"),
])
def test_check_flags_problems(row, expect):
    assert any(expect in p for p in row.problems())


def test_check_accepts_a_variant_without_dots_on_cuda_cores():
    assert Row("k", "v", "c", "sm_90", shared=1024, mma="", dots=False).problems() == []


def test_check_accepts_a_good_row():
    assert Row("k", "v", "c", "sm_90", shared=1024, mma="wgmma", spill=SPILL_BUDGET).problems() == []


def test_a_skipped_row_is_no_failure():
    assert Row("k", "v", "c", "sm_80", skipped="built for sm_90 only").problems() == []


@pytest.mark.parametrize("args, env, message", [
    (["--target", "sm_99"], ENV, "fastlora check-kernels: unknown target 'sm_99'; known: sm_80, sm_90"),
    (["--kernel", "_nope"], ENV, "fastlora check-kernels: unknown kernel _nope; known: "),
    ([], {**ENV, "TRITON_INTERPRET": "1"},
     "fastlora check-kernels: check-kernels compiles for GPUs: unset TRITON_INTERPRET"),
])
def test_bad_invocation_is_one_line_and_exit_code_2(args, env, message):
    proc = subprocess.run([sys.executable, "-m", "fastlora", "check-kernels", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1


def test_run_refuses_interpreter_and_unknown_target(monkeypatch):
    from fastlora.kernels import check as check_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        check_kernels.run(["sm_80"])
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="unknown target"):
        check_kernels.run(["sm_75"])
