"""The GPU-less kernel check: every kernel and autotune config compiles for sm_80/sm_90."""
import os
import subprocess
import sys

import pytest

from fastlora.check_kernels import SMEM_LIMIT, Row


def test_check_kernels_passes_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastlora", "check-kernels",
                           "--target", "sm_80", "--target", "sm_90"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("_")]
    kernels = {line.split()[0] for line in rows}
    assert kernels >= {"_lora_shrink_kernel", "_lora_linear_kernel", "_lora_dy_kernel",
                       "_lora_da_kernel", "_dora_norm_kernel", "_q4_matmul_kernel"}
    assert proc.stdout.rstrip().endswith(f"{len(rows)} compilations, 0 failed")
    assert all(line.rstrip().endswith("ok") for line in rows)
    assert any(" sm_90 " in line and "wgmma" in line for line in rows)


@pytest.mark.parametrize("row, gemm, expect", [
    (Row("k", "v", "c", "sm_80", shared=SMEM_LIMIT[80] + 1, mma="mma.sync"), True, "shared memory"),
    (Row("k", "v", "c", "sm_90", shared=1024, mma=""), True, "tensor-core"),
    (Row("k", "v", "c", "sm_90", error="CompilationError: boom"), True, "boom"),
])
def test_check_flags_problems(row, gemm, expect):
    assert any(expect in p for p in row.problems(gemm))


def test_check_accepts_a_good_row():
    assert Row("k", "v", "c", "sm_90", shared=1024, mma="wgmma").problems(True) == []


def test_check_refuses_interpreter_and_unknown_target(monkeypatch):
    from fastlora import check_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        check_kernels.run(["sm_80"])
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="unknown target"):
        check_kernels.run(["sm_75"])
