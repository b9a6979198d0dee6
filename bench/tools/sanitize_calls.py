"""One small call of every kernel family, for ``compute-sanitizer --tool memcheck``.

Forward and backward of ``lora_linear`` (16-bit and fp32 adapters, with and without
dropout), ``dora_linear`` with its weight norm, and ``multi_lora_linear`` (LoRA adapters
with dropout, and DoRA adapters), on odd shapes (M, K, N not multiples of 16) with a bias;
then ``lora_linear`` and ``dora_linear`` again on 16-byte rows with each implementation of
their linear stages forced (``FASTLORA_IMPL``: fused, cublas, and tma on sm_90), since the
automatic choice runs only the fastest. Each call without dropout is compared with ``fastlora.reference`` computed in fp32 (so the
run checks the numbers as well as the memory accesses); calls with dropout are checked for
finite results. Exits 1 if a check fails.

    compute-sanitizer --tool memcheck python bench/tools/sanitize_calls.py
    python bench/tools/sanitize_calls.py --dry-run        (CPU, Triton interpreter)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: see tools/__init__.py
from common import Run, dtype_name, forced_impl  # noqa: E402

M, K, N, R = 37, 70, 48, 8
ALIGNED = (37, 72, 40)  # M, K, N with 16-byte rows, which the TMA kernel needs
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # relative norm


def leaves(tensors: dict) -> dict:
    """Fresh leaf copies (gradients for the floating ones that had requires_grad)."""
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                else v) for k, v in tensors.items()}


def run_case(fn, ref, inputs: dict, dy: torch.Tensor, tolerance: float) -> float:
    """Forward and backward of ``fn(**inputs)``; returns the largest relative error of the
    output and gradients against ``ref`` in fp32 (0 when ``ref`` is None: finite check)."""
    got_in = leaves(inputs)
    y = fn(**got_in)
    y.backward(dy)
    got = [y] + [t.grad for t in got_in.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    if any(not torch.isfinite(t).all() for t in got):
        return float("inf")
    if ref is None:
        return 0.0
    want_in = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in leaves(inputs).items()}
    want_in = leaves(want_in)
    y_ref = ref(**want_in)
    y_ref.backward(dy.float())
    want = [y_ref] + [t.grad for t in want_in.values()
                      if isinstance(t, torch.Tensor) and t.requires_grad]
    return max(((g.float() - w).norm() / w.norm().clamp_min(1e-12)).item()
               for g, w in zip(got, want))


def layer_cases(run: Run, m: int, k: int, n: int, dtypes):
    """(name, fn, reference or None, inputs, dy, tolerance) of ``lora_linear`` (with and
    without dropout) and ``dora_linear`` on one ``[m, k]`` x ``[n, k]`` layer, for each of
    the adapter ``dtypes``."""
    import fastlora
    from fastlora import reference

    half = run.half
    x = run.randn(m, k, requires_grad=True, seed=1)
    w = run.randn(n, k, seed=2) * 0.1
    bias = run.randn(n, seed=3)
    dy = run.randn(m, n, seed=4)
    for dtype in dtypes:
        A = (run.randn(R, k, dtype=dtype, seed=10) * 0.1).requires_grad_()
        B = (run.randn(n, R, dtype=dtype, seed=11) * 0.1).requires_grad_()
        base = dict(x=x, weight=w, bias=bias, lora_A=A, lora_B=B, scaling=0.5)
        yield (f"lora_linear, {dtype_name(dtype)} adapter", fastlora.lora_linear, reference.lora_linear,
               base, dy, TOLERANCE[half])
        yield (f"lora_linear with dropout, {dtype_name(dtype)} adapter",
               lambda **a: fastlora.lora_linear(**a, dropout_p=0.1, training=True, seed=5),
               None, base, dy, TOLERANCE[half])
        mag = (run.randn(n, dtype=dtype, seed=12).abs() + 0.5).requires_grad_()
        yield (f"dora_linear, {dtype_name(dtype)} adapter", fastlora.dora_linear, reference.dora_linear,
               base | {"magnitude": mag}, dy, TOLERANCE[half])


def cases(run: Run):
    """(name, fn, reference or None, inputs, dy, tolerance) for every kernel family."""
    import fastlora
    from fastlora import pack_adapters, reference

    yield from layer_cases(run, M, K, N, (run.half, torch.float32))
    half = run.half
    x = run.randn(M, K, requires_grad=True, seed=1)
    w = run.randn(N, K, seed=2) * 0.1
    bias = run.randn(N, seed=3)
    dy = run.randn(M, N, seed=4)

    def adapter(dtype, seed):
        return tuple((run.randn(*shape, dtype=dtype, seed=seed + i) * 0.1).requires_grad_()
                     for i, shape in enumerate([(R, K), (N, R)]))

    lora = [adapter(half, 20 + 2 * i) for i in range(3)]
    index = torch.tensor([i % 4 - 1 for i in range(M)], dtype=torch.int32, device=run.device)
    for name, dora, dropout in (("LoRA", False, None), ("LoRA with dropout", False, (0.1, 0.0, 0.2)),
                                ("DoRA", True, None)):
        packed = [(a, b, 0.5 + i)
                  + (((run.randn(N, dtype=half, seed=30 + i).abs() + 0.5).requires_grad_(),)
                     if dora else ()) for i, (a, b) in enumerate(lora)]

        def multi(x, weight, bias, training, packed=packed, dropout=dropout):
            bank = pack_adapters(packed, weight=weight, dropout=dropout)
            return fastlora.multi_lora_linear(x, weight, bias, bank, index, training=training,
                                              seed=6)

        def multi_ref(x, weight, bias, training, packed=packed):
            fp32 = [tuple(t.detach().float() if isinstance(t, torch.Tensor) else t for t in a)
                    for a in packed]
            bank = pack_adapters(fp32, weight=weight)
            return reference.multi_lora_linear(x, weight, bias, bank, index)

        yield (f"multi_lora_linear, {name}", multi, None if dropout else multi_ref,
               dict(x=x, weight=w, bias=bias, training=dropout is not None), dy, TOLERANCE[half])


def forced_cases(run: Run):
    """(FASTLORA_IMPL value, case) for each implementation of the linear stages this GPU
    runs, on 16-byte rows (16-bit adapters)."""
    hopper = run.dry_run or torch.cuda.get_device_capability()[0] == 9
    for impl in ("fused", "cublas", "tma") if hopper else ("fused", "cublas"):
        for case in layer_cases(run, *ALIGNED, (run.half,)):
            yield impl, case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, fp16")
    args = p.parse_args(argv)
    args.budget_s = None
    run = Run.start("sanitize_calls.py", args)
    failed = 0
    every = [(None, case) for case in cases(run)] + list(forced_cases(run))
    for impl, (name, fn, ref, inputs, dy, tolerance) in every:
        with forced_impl(impl):
            err = run_case(fn, ref, inputs, dy, tolerance)
        name += f" [FASTLORA_IMPL={impl}]" if impl else ""
        ok = err <= tolerance
        failed += not ok
        what = "finite" if ref is None else f"max relative error {err:.2e} (tolerance {tolerance:.0e})"
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {what if ok or ref else 'non-finite values'}",
              flush=True)
    run.sync()
    print(f"sanitize_calls: {failed} of the checks failed" if failed else
          "sanitize_calls: every kernel family ran and checked", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
