"""``python -m fastlora <command>``: demo, check-kernels, bench, and the adapter-file tools."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USAGE = """usage: python -m fastlora <command> [args]

commands:
  demo            check patched-vs-PEFT correctness (and timing on a GPU) on a small model
  check-kernels   compile every kernel/config for sm_80 and sm_90 without a GPU
  bench           run the layer benchmarks (needs a GPU)
  inspect FILE    describe a LoRA adapter file
  convert IN OUT  convert an adapter between formats
  resize IN OUT   reduce an adapter's ranks by SVD
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as run
    elif command == "check-kernels":
        from .check_kernels import main as run
    elif command == "bench":
        script = Path(__file__).resolve().parents[1] / "bench" / "bench_layer.py"
        if not script.exists():
            print("bench/ ships with the source checkout, not the wheel: run it from a clone",
                  file=sys.stderr)
            return 2
        return subprocess.call([sys.executable, str(script), *rest])
    elif command in ("inspect", "convert", "resize"):
        from .io.cli import main as io_main
        return io_main([command, *rest])
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
