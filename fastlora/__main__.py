"""``fastlora <command>`` (or ``python -m fastlora <command>``): demo, check-kernels, bench, and
the adapter-file tools."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USAGE = """usage: fastlora <command> [args]   (or: python -m fastlora <command> [args])

commands:
  demo            check a patched PEFT model against PEFT on a small model (timed on a GPU)
  check-kernels   compile every kernel and autotune config for sm_80 / sm_90, no GPU needed
  bench           run the layer benchmark (needs a GPU and a source checkout)
  inspect FILE    describe an adapter file: format, layers, ranks, alphas, scales, base model
  convert IN OUT  rewrite an adapter in another format; LoHa/LoKr into LoRA
  resize IN OUT   reduce an adapter's ranks by SVD

`fastlora <command> --help` describes a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as run
    elif command == "check-kernels":
        from .kernels.check import main as run
    elif command == "bench":
        script = Path(__file__).resolve().parents[1] / "bench" / "bench_layer.py"
        if not script.exists():
            print("fastlora bench: error: bench/ ships with the source checkout, not the wheel: run it from a clone",
                  file=sys.stderr)
            return 2
        return subprocess.call([sys.executable, str(script), *rest])
    elif command in ("inspect", "convert", "resize"):
        from .io.cli import main as io_main
        return io_main([command, *rest])
    else:
        print(f"fastlora: error: unknown command {command!r} (see `fastlora --help`)", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
