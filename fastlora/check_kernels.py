"""Ahead-of-time compile of every kernel and autotune config for GPU targets, no GPU needed.

``python -m fastlora check-kernels --target sm_80 --target sm_90`` prints one row per
(kernel, variant, config, target): shared memory, registers, spilled/stack bytes and the
tensor-core instruction found, and exits non-zero on a compile failure, a GEMM kernel
without tensor-core instructions, or shared memory over the target's limit. A kernel built
for one architecture (the sm_90 TMA kernel) is reported skipped on the others.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# Shared memory a block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}


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

    def problems(self, gemm: bool) -> list[str]:
        if self.skipped:
            return []
        cap = int(self.target[3:])
        out = [self.error] if self.error else []
        if not self.error and self.shared > SMEM_LIMIT[cap]:
            out.append(f"shared memory {self.shared} > {SMEM_LIMIT[cap]}")
        if not self.error and gemm and not self.mma:
            out.append("no tensor-core instruction")
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
              target)
    if variant.only is not None and int(target[3:]) != variant.only:
        row.skipped = f"built for sm_{variant.only} only"
        return row
    constexprs = {**variant.constexprs, **config.kwargs}
    types = variant.all_types(config.kwargs)
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        row.error = f"no type or value for {missing}"
        return row
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=variant.attrs()),
            target=GPUTarget("cuda", int(target[3:]), 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        row.shared = compiled.metadata.shared
        row.regs, row.spill = _resource_usage(compiled.asm["cubin"])
        row.mma = _mma(compiled.asm["ptx"])
    except Exception as exc:  # a compile failure is a finding, reported in the row
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    return row


def run(targets: list[str], jobs: int | None = None, out=sys.stdout,
        kernels: list[str] | None = None) -> int:
    """Compile everything (or the kernels named in ``kernels``) for ``targets``
    (``sm_80``...); print the table; return the exit code."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("check-kernels compiles for GPUs: unset TRITON_INTERPRET")
    from fastlora.kernels.aot import VARIANTS

    for t in targets:
        if not re.fullmatch(r"sm_\d+", t) or int(t[3:]) not in SMEM_LIMIT:
            raise ValueError(f"unknown target {t!r}; known: {', '.join(f'sm_{c}' for c in SMEM_LIMIT)}")
    names = {variant.kernel.fn.__name__ for variant in VARIANTS}
    unknown = set(kernels or ()) - names
    if unknown:
        raise ValueError(f"unknown kernel {sorted(unknown)}; known: {', '.join(sorted(names))}")
    work = [(v, c, t) for v, variant in enumerate(VARIANTS)
            if not kernels or variant.kernel.fn.__name__ in kernels
            for c in range(len(variant.kernel.configs)) for t in targets]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        rows = list(pool.map(_compile, work))
    failures = 0
    header = f"{'kernel':<22} {'variant':<36} {'config':<58} {'target':<6} {'smem':>7} {'regs':>4} {'spill':>5} {'mma':<8} status"
    print(header, file=out)
    for (v, _, _), row in zip(work, rows):
        problems = row.problems(VARIANTS[v].gemm)
        failures += bool(problems)
        status = ("FAIL: " + "; ".join(problems) if problems else
                  f"skipped: {row.skipped}" if row.skipped else "ok")
        print(f"{row.kernel:<22} {row.variant:<36} {row.config:<58} {row.target:<6} "
              f"{row.shared:>7} {row.regs:>4} {row.spill:>5} {row.mma or '-':<8} {status}", file=out)
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
    return run(args.target or ["sm_80", "sm_90"], args.jobs, kernels=args.kernel)
