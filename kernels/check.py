"""Ahead-of-time compile of every kernel and autotune config for GPU targets, no GPU needed.

``python -m fastlora check-kernels --target sm_80 --target sm_90`` prints one row per
(kernel, variant, config, target) as it finishes: shared memory, registers, spilled/stack
bytes and the tensor-core instruction found, then a summary; it exits 1 on a compile
failure, a kernel with dots but no tensor-core instructions, shared memory over the target's
limit, or spills over ``SPILL_BUDGET``; 2 on bad arguments. A kernel built for one
architecture (the sm_90 TMA kernel) is reported skipped on the others. ``--kernel NAME``
compiles one kernel only.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}
# Local-memory (spill + stack) bytes per thread a kernel may use. Every kernel here is a
# GEMM whose inner loop must run from registers: a few values spilled around the
# prologue cost little, while the kilobytes that full-fp32 FMA dots spilled (up to ~5 KB
# per thread in the dy pass, ~3 KB in dA) turn each K step into local-memory traffic.
SPILL_BUDGET = 64


@dataclass
class Row:
    kernel: str
    variant: str
    config: str
    target: str
    shared: int = 0
    regs: int = 0
    spill: int = 0
    mma: str = ""
    error: str = ""
    skipped: str = ""
    dots: bool = True  # the variant has tl.dot: tensor-core instructions expected

    def problems(self) -> list[str]:
        if self.skipped:
            return []
        if self.error:
            return [self.error]
        out = []
        cap = int(self.target[3:])
        if self.shared > SMEM_LIMIT[cap]:
            out.append(f"shared memory {self.shared} > {SMEM_LIMIT[cap]}")
        if self.dots and not self.mma:
            out.append("no tensor-core instruction")
        if self.spill > SPILL_BUDGET:
            out.append(f"spills {self.spill} B/thread > budget {SPILL_BUDGET} B")
        return out


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes) from cuobjdump, which ships with Triton."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    def field(name):
        m = re.search(rf"\b{name}:(\d+)", text)
        return int(m.group(1)) if m else 0
    return field("REG"), field("STACK") + field("LOCAL")


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return ""


def _compile(job: tuple[int, int, str]) -> Row:
    variant_index, config_index, target = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlora.kernels.aot import VARIANTS

    variant = VARIANTS[variant_index]
    config = variant.kernel.configs[config_index]
    fn = variant.kernel.fn
    cfg = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    row = Row(fn.__name__, variant.label, f"{cfg}, w={config.num_warps}, s={config.num_stages}",
              target, dots=variant.dots)
    if variant.only is not None and int(target[3:]) != variant.only:
        row.skipped = f"built for sm_{variant.only} only"
        return row
    signature, constexprs, attrs = variant.compile_args(config.kwargs)
    missing = [n for n, t in signature.items()
               if t == "constexpr" and (fn.arg_names.index(n),) not in constexprs]
    if missing:
        row.error = f"no type or value for {missing}"
        return row
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", int(target[3:]), 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        row.shared = compiled.metadata.shared
        row.regs, row.spill = _resource_usage(compiled.asm["cubin"])
        row.mma = _mma(compiled.asm["ptx"])
    except Exception as exc:  # a compile failure is a finding, reported in the row
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    return row


def check_targets(targets: list[str]) -> None:
    """Raise ValueError naming the first target that is not ``sm_<known capability>``."""
    known = ", ".join(f"sm_{c}" for c in SMEM_LIMIT)
    for t in targets:
        if not re.fullmatch(r"sm_\d+", t) or int(t[3:]) not in SMEM_LIMIT:
            raise ValueError(f"unknown target {t!r}; known: {known}")


def check_environment() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("check-kernels compiles for GPUs: unset TRITON_INTERPRET")


def check_kernel_names(kernels: list[str] | None) -> None:
    """Raise ValueError naming the kernels (``--kernel``) that check-kernels does not know."""
    from fastlora.kernels.aot import VARIANTS

    names = {variant.kernel.fn.__name__ for variant in VARIANTS}
    unknown = sorted(set(kernels or ()) - names)
    if unknown:
        raise ValueError(f"unknown kernel {', '.join(unknown)}; known: {', '.join(sorted(names))}")


def run(targets: list[str], jobs: int | None = None, out=sys.stdout,
        kernels: list[str] | None = None) -> int:
    """Compile everything (or only the kernels named in ``kernels``) for ``targets``
    (``sm_80``...); print each row as it finishes and a summary; return the exit code (0 ok,
    1 problems)."""
    check_environment()
    check_targets(targets)
    check_kernel_names(kernels)
    from fastlora.kernels.aot import VARIANTS

    work = [(v, c, t) for v, variant in enumerate(VARIANTS)
            if not kernels or variant.kernel.fn.__name__ in kernels
            for c in range(len(variant.kernel.configs)) for t in targets]
    start = time.monotonic()
    print(f"compiling {len(work)} kernel variants for {', '.join(targets)}", file=out, flush=True)
    print(f"{'kernel':<22} {'variant':<44} {'config':<58} {'target':<6} {'smem':>7} {'regs':>4} "
          f"{'spill':>5} {'mma':<8} status", file=out, flush=True)
    rows, failures = [], 0
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        for row in pool.map(_compile, work):  # in order, each as soon as it is done
            problems = row.problems()
            failures += bool(problems)
            rows.append(row)
            status = ("FAIL: " + "; ".join(problems) if problems else
                      f"skipped: {row.skipped}" if row.skipped else "ok")
            print(f"{row.kernel:<22} {row.variant:<44} {row.config:<58} {row.target:<6} "
                  f"{row.shared:>7} {row.regs:>4} {row.spill:>5} {row.mma or '-':<8} {status}",
                  file=out, flush=True)
    worst = max(rows, key=lambda r: r.spill)
    print(f"summary: {len(rows)} compilations in {time.monotonic() - start:.0f} s; most spill "
          f"{worst.spill} B/thread ({worst.kernel}, {worst.variant}, {worst.target}; budget "
          f"{SPILL_BUDGET} B); most shared memory {max(r.shared for r in rows)} B", file=out)
    print(f"{len(rows)} compilations, {failures} failed", file=out)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora check-kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", default=None,
                        help="GPU target such as sm_80 or sm_90 (repeatable; default both)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations")
    parser.add_argument("--kernel", action="append", default=None,
                        help="compile only this kernel, e.g. _lora_linear_tma_kernel (repeatable)")
    args = parser.parse_args(argv)
    targets = args.target or ["sm_80", "sm_90"]
    try:
        check_environment()
        check_targets(targets)
        check_kernel_names(args.kernel)
    except (ValueError, RuntimeError) as exc:
        print(f"fastlora check-kernels: {exc}", file=sys.stderr)
        return 2
    return run(targets, args.jobs, kernels=args.kernel)
