"""Host cost of one layer call: Python calls and microseconds, Triton's launches stubbed.

On a GPU, decode and small-batch training are host-bound: the Python that runs per layer
call is time the GPU waits, times every linear layer of the model at every token. This
benchmark measures that Python for each way a LoRA layer runs, beside unpatched PEFT on
the same inputs:

- ``peft``: PEFT's ``lora.Linear``, unpatched;
- ``nn.LoraLinear``: ``fastlora.nn.LoraLinear``;
- ``patched peft``: the PEFT layer after ``fastlora.patch``;
- ``serve decode``: a layer of a model attached to an ``AdapterBank`` (``fastlora.serve``),
  one row per call routed to an adapter, as a decode step calls it;

each in eval (``torch.no_grad``) and with grad (the adapter trainable, autograd recording;
the serve layer's bank is not trainable: grad mode only).

``calls``: Python function calls (``sys.setprofile`` call events) of one layer call after
warm-up, Triton's own frames left out; ``bwd_calls`` (with grad): those of
``y.backward(ones)`` on that call's output after warm-up backwards with the same dy,
``torch.autograd.backward``'s own Python included (PEFT's row is that alone: its backward
runs in C++); ``host_us``: microseconds
per call (median of rounds). Both with every Triton launch replaced by a no-op, so they count what fastlora,
PEFT and torch do on the host before the kernels run (on the CPU the Triton backend is
taken through ``TRITON_INTERPRET=1``, whose launches are stubbed too). On a GPU a third
column, ``wall_us``, times the call with its real launches, back to back (eager decode).

    python bench/bench_host.py [--k 64] [--n 64] [--rank 8] [--rows 1] [--rounds 20]
                               [--out FILE.md]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--cuda" not in sys.argv:
    # the CPU takes the Triton path through the interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown_table  # noqa: E402

COLUMNS = ["path", "mode", "calls", "calls/peft", "bwd_calls", "host_us", "wall_us"]
MODES = ("eval", "grad")


def _no_launch(self, *args, **kwargs) -> None:
    """A stubbed launch (not counted: Triton's launcher is left out)."""


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel launch (jit, autotuned, interpreted) is a no-op inside."""
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    classes = (autotuner.Autotuner, jit.JITFunction, interpreter.InterpretedFunction)
    saved = [(cls, cls.run) for cls in classes]
    for cls in classes:
        cls.run = _no_launch
    try:
        yield
    finally:
        for cls, run in saved:
            cls.run = run


def count_calls(fn, *args) -> int:
    """Python call events of ``fn(*args)`` (``fn``'s own included: ``layer(x)``, or
    ``y.backward(dy)``), frames of Triton's own modules left out."""
    import triton

    skip = os.path.dirname(triton.__file__)
    n = 0

    def profile(frame, event, arg):
        nonlocal n
        if (event == "call" and frame.f_code is not _no_launch.__code__
                and not frame.f_code.co_filename.startswith(skip)):
            n += 1

    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return n


def time_us(layer, x, rounds: int, calls: int = 50, sync=lambda: None) -> float:
    """Median microseconds per ``layer(x)`` over ``rounds`` rounds of ``calls`` calls."""
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def make_paths(k: int, n: int, r: int, dtype: torch.dtype, device) -> dict:
    """path name -> (layer, (trainable params)), one base weight and adapter for all."""
    import fastlora
    from fastlora.serve import attach
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=True, device=device, dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["0"])

    def peft_layer():
        model = get_peft_model(nn.Sequential(nn.Linear(k, n, device=device, dtype=dtype)), config)
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.base_layer.weight.copy_(base.weight)
            layer.base_layer.bias.copy_(base.bias)
            layer.lora_B["default"].weight.normal_(std=0.02)
        return model, layer

    _, peft = peft_layer()
    patched_model, patched = peft_layer()
    fastlora.patch(patched_model)
    lora = fastlora.nn.LoraLinear.from_linear(nn.Linear(k, n, device=device, dtype=dtype), r, 2 * r)
    lora.load_state_dict({**base.state_dict(), "lora_A": peft.lora_A["default"].weight,
                          "lora_B": peft.lora_B["default"].weight})
    served = nn.Sequential(nn.Linear(k, n, device=device, dtype=dtype))
    served.load_state_dict({"0." + key: v for key, v in base.state_dict().items()})
    bank = fastlora.AdapterBank(served, max_rank=r)
    bank.add("a", peft.lora_A["default"].weight.detach(), peft.lora_B["default"].weight.detach(),
             peft.scaling["default"], layer="0")
    attach(served, bank)
    return {"peft": (peft, [peft.lora_A["default"].weight, peft.lora_B["default"].weight]),
            "nn.LoraLinear": (lora, [lora.lora_A, lora.lora_B]),
            "patched peft": (patched, [patched.lora_A["default"].weight,
                                       patched.lora_B["default"].weight]),
            "serve decode": (served[0], []), "_bank": bank}


def measure(k=64, n=64, r=8, rows=1, rounds=20, dtype=torch.float16, device="cpu",
            wall: bool | None = None) -> list[dict]:
    """One row per (path, mode): calls, host_us (launches stubbed) and, on a GPU (or with
    ``wall``), wall_us (real launches)."""
    from fastlora.choice.backend import interpreting
    from fastlora.serve import routed

    if torch.device(device).type == "cpu" and not interpreting():
        raise RuntimeError("bench_host on the CPU needs TRITON_INTERPRET=1 (set before triton "
                           "is imported), else fastlora runs its PyTorch reference")
    paths = make_paths(k, n, r, dtype, device)
    bank = paths.pop("_bank")
    routing = bank.index(["a"] * rows)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"
    wall = cuda if wall is None else wall
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = []
    for mode in MODES:
        for name, (layer, params) in paths.items():
            layer.train(False)
            for p in params:
                p.requires_grad_(mode == "grad")
            grad = torch.no_grad() if mode == "eval" else torch.enable_grad()
            route = routed(routing) if name == "serve decode" else contextlib.nullcontext()
            with grad, route:
                with stubbed_launches():
                    for _ in range(3):
                        y = layer(x)
                        if mode == "grad":  # the measured backward's dy layout
                            y.backward(torch.ones_like(y))
                    calls = count_calls(layer, x)
                    host = time_us(layer, x, rounds)
                    row = dict(path=name, mode=mode, calls=calls, host_us=host)
                    if mode == "grad":
                        y = layer(x)
                        row["bwd_calls"] = count_calls(y.backward, torch.ones_like(y))
                if wall:
                    for _ in range(3):
                        layer(x)
                    row["wall_us"] = time_us(layer, x, rounds, sync=sync)
            out.append(row)
    for row in out:
        peft = next(o for o in out if o["path"] == "peft" and o["mode"] == row["mode"])
        row["calls/peft"] = row["calls"] / peft["calls"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--cuda", action="store_true", help="run on the GPU (also wall time)")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        print("bench_host: --cuda without a CUDA device", file=sys.stderr)
        return 2
    device = "cuda" if args.cuda else "cpu"
    rows = measure(args.k, args.n, args.rank, args.rows, args.rounds, device=device)
    import triton

    text = (f"{torch.cuda.get_device_name() if args.cuda else 'CPU'}; torch {torch.__version__}, "
            f"Triton {triton.__version__}; x fp16 [{args.rows}, {args.k}], W [{args.n}, "
            f"{args.k}], r={args.rank}\n\n" + markdown_table(rows, COLUMNS))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
