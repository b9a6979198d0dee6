"""Command line for adapter files: ``inspect``, ``convert`` and ``resize``.

``python -m fastlora inspect FILE`` (likewise ``convert`` and ``resize``) runs
``main(["inspect", "FILE"])``; ``python -m fastlora.io.cli ...`` does the same. ``main``
returns 0 on success, 1 when a file or argument is rejected (the reason on stderr), 2 for
command-line usage errors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .adapter import Adapter
from .load import load_adapter
from .resize import METHODS, LayerResize, resize
from .save import SAVE_FORMATS, save_adapter


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed the message
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # AdapterFormatError is a ValueError
        print(f"fastlora {args.command}: error: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description="Inspect, convert and resize LoRA adapter files.")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="describe an adapter: format, layers, ranks, alphas, scales")
    inspect.add_argument("file", help="a .safetensors file or a PEFT adapter directory")
    inspect.set_defaults(run=_inspect)

    convert = commands.add_parser("convert", help="rewrite an adapter in another format")
    convert.add_argument("input")
    convert.add_argument("output", help="a directory for --to peft, a .safetensors file otherwise")
    convert.add_argument("--to", required=True, choices=SAVE_FORMATS)
    convert.set_defaults(run=_convert)

    shrink = commands.add_parser("resize", help="reduce ranks by SVD, keeping each layer's scale")
    shrink.add_argument("input")
    shrink.add_argument("output")
    shrink.add_argument("--method", choices=METHODS, default="fixed")
    shrink.add_argument("--threshold", type=float,
                        help="sv_ratio: largest/smallest kept singular value (>= 1); "
                             "sv_cumulative, sv_fro: fraction to keep (0..1]")
    shrink.add_argument("--rank", type=int, help="the new rank, for --method fixed")
    shrink.add_argument("--max-rank", type=int, help="cap on every layer's new rank")
    shrink.add_argument("--to", choices=SAVE_FORMATS,
                        help="output format (default: the input's, peft for light-lora input)")
    shrink.set_defaults(run=_resize)

    for command in (inspect, convert, shrink):
        command.add_argument("--allow-pickle", action="store_true",
                             help="read .bin/.pt pickle files (with torch.load weights_only=True)")
    return parser


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in [header, *rows])


def _size(path: Path) -> int:
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files)


def _bytes(n: int) -> str:
    size, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def describe(adapter: Adapter, path: Path) -> str:
    """The ``inspect`` report: a summary, then one row per layer."""
    layers = adapter.layers.values()
    conv = sum(layer.is_conv for layer in layers)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for layer in layers for t in (layer.A, layer.B)})
    tensor_bytes = sum(t.numel() * t.element_size() for layer in layers
                       for t in (layer.A, layer.B, layer.magnitude, layer.bias) if t is not None)
    lines = [
        f"file:        {path} ({_bytes(_size(path))} on disk)",
        f"format:      {adapter.source_format}",
        f"layers:      {len(adapter.layers)} ({len(adapter.layers) - conv} linear, {conv} conv)",
        f"parameters:  {adapter.num_parameters():,} ({_bytes(tensor_bytes)})",
        f"dtypes:      {', '.join(dtypes)}",
        f"ranks:       {', '.join(str(r) for r in sorted({layer.rank for layer in layers}))}",
        f"rsLoRA: {_yes_no(adapter.use_rslora)}   DoRA: {_yes_no(adapter.use_dora)}   "
        f"lora_B bias: {_yes_no(any(layer.bias is not None for layer in layers))}",
        *(f"{key}: {value}" for key, value in adapter.config.items()),
    ]
    rows = [[name, "conv" if layer.is_conv else "linear", str(layer.rank), f"{layer.alpha:g}",
             f"{layer.scale:.6g}", str(list(layer.A.shape)), str(list(layer.B.shape)),
             str(layer.A.dtype).removeprefix("torch.")]
            for name, layer in adapter.layers.items()]
    header = ["layer", "kind", "rank", "alpha", "scale", "A", "B", "dtype"]
    return "\n".join([*lines, "", _table(header, rows)])


def _inspect(args) -> int:
    adapter = load_adapter(args.file, allow_pickle=args.allow_pickle)
    print(describe(adapter, Path(args.file)))
    return 0


def _convert(args) -> int:
    adapter = load_adapter(args.input, allow_pickle=args.allow_pickle)
    save_adapter(adapter, args.output, args.to)
    print(f"wrote {args.output}: {len(adapter.layers)} layers, {adapter.source_format} -> {args.to}")
    return 0


def _report(report: dict[str, LayerResize]) -> str:
    rows = [[name, f"{r.old_rank} -> {r.new_rank}", f"{r.fro_retained:.2f}", f"{r.sv_retained:.2f}"]
            for name, r in report.items()]
    return _table(["layer", "rank", "fro %", "sv %"], rows)


def _resize(args) -> int:
    adapter = load_adapter(args.input, allow_pickle=args.allow_pickle)
    resized, report = resize(adapter, rank=args.rank, method=args.method, threshold=args.threshold,
                             max_rank=args.max_rank, progress=True)
    out_format = args.to or (adapter.source_format if adapter.source_format in SAVE_FORMATS else "peft")
    save_adapter(resized, args.output, out_format)
    print(_report(report))
    print(f"wrote {args.output} ({out_format}): {adapter.num_parameters():,} -> "
          f"{resized.num_parameters():,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
