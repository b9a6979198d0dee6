"""Command line for adapter files: ``inspect``, ``convert`` and ``resize``.

``fastlora inspect FILE`` (likewise ``convert`` and ``resize``; also ``python -m fastlora ...``
and ``python -m fastlora.io.cli ...``) runs ``main(["inspect", "FILE"])``. ``main`` returns 0 on
success and 2 on any error, printed as one line on stderr naming the problem.

Outputs: a ``.safetensors`` path is a file, anything else a PEFT directory; an existing
output is replaced only with ``--force``. Progress bars go to stderr, on a terminal only, and
not with ``--quiet``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .adapter import Adapter
from .errors import SkippedTensorsWarning
from .load import load_adapter
from .model_dir import load_model_dir
from .resize import METHODS, LayerResize, resize, to_lora
from .save import SAVE_FORMATS, save_adapter
from .summary import layer_table, size_text, summarize, summary_lines, table

FILE_SUFFIX = ".safetensors"
_LORA_FORMAT = {"peft": "peft", "diffusers": "diffusers", "kohya": "kohya", "light-lora": "kohya",
                "lycoris": "kohya"}
"""The LoRA format an input is written back in by default (``--to lora``)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: ``fastlora resize: error: ... (see fastlora resize --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class CommandError(Exception):
    """A problem with the command's arguments found after parsing (exit code 2)."""


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed the message
        return e.code if isinstance(e.code, int) else 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            return args.run(args)
    except BrokenPipeError:  # `fastlora inspect ... | head`: a reader that stopped is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    except Exception as e:  # every failure is one line: ours name the problem, others their type too
        print(f"fastlora {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


def _one_line_warnings(command: str, show):
    """A ``warnings.showwarning`` printing this package's warnings as one line each."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SkippedTensorsWarning):
            print(f"fastlora {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _message(e: Exception) -> str:
    """One line: an OSError as ``<file>: <reason>``; our errors (CommandError, ValueError:
    AdapterFormatError among them) as they are; anything else prefixed by its type."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, (CommandError, ValueError, OSError)):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastlora", description="Inspect, convert and resize LoRA adapter files.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    inspect = commands.add_parser(
        "inspect", help="describe an adapter: format, layers, ranks, alphas, scales, dtypes, size, base model",
        description="Describe an adapter file: a summary and a table of its layers grouped by kind, rank, "
                    "alpha, scale and dtype.")
    inspect.add_argument("file", help="a .safetensors file or a PEFT adapter directory")
    inspect.add_argument("--layers", action="store_true", help="also list every layer")
    inspect.add_argument("--json", action="store_true", help="print everything as JSON (for scripts)")
    inspect.set_defaults(run=_inspect)

    convert = commands.add_parser(
        "convert", help="rewrite an adapter in another format (LoHa/LoKr: into LoRA, with --rank or --method)",
        description="Rewrite an adapter in another format. LyCORIS LoHa and LoKr layers become LoRA by a "
                    "truncated SVD of their weight change: give --rank R or --method with --threshold.")
    convert.add_argument("input", help="a .safetensors file or a PEFT adapter directory")
    convert.add_argument("output", help=f"a {FILE_SUFFIX} file, or a directory for --to peft")
    convert.add_argument("--to", required=True, choices=(*SAVE_FORMATS, "lora"),
                         help="output format; lora: LoRA in the input's own format (kohya for LyCORIS input)")
    _rank_options(convert, "for LoHa/LoKr layers: ")
    convert.set_defaults(run=_convert)

    shrink = commands.add_parser(
        "resize", help="reduce ranks by SVD, keeping each layer's scale",
        description="Reduce every layer's rank by a truncated SVD, keeping its scale (LoHa/LoKr layers "
                    "become LoRA). Give --rank R, or --method with --threshold.")
    shrink.add_argument("input", help="a .safetensors file or a PEFT adapter directory")
    shrink.add_argument("output", help=f"a {FILE_SUFFIX} file, or a directory for PEFT output")
    shrink.add_argument("--to", choices=SAVE_FORMATS,
                        help="output format (default: the input's; kohya for LyCORIS and Light-LoRA input)")
    _rank_options(shrink, "")
    shrink.set_defaults(run=_resize)

    for command, writes in ((inspect, False), (convert, True), (shrink, True)):
        command.add_argument("--base-model", metavar="DIR", type=Path,
                             help="a local transformers or diffusers model (or pipeline) directory: bind the "
                                  "layer names to its modules and check their shapes (no weights are read)")
        command.add_argument("--strict", action="store_true",
                             help="refuse files holding tensors that are not adapter weights (default: skip "
                                  "them with a warning)")
        command.add_argument("--allow-pickle", action="store_true",
                             help="read .bin/.pt pickle files (with torch.load weights_only=True)")
        if writes:
            command.add_argument("--force", action="store_true", help="replace the output if it exists")
            command.add_argument("--quiet", action="store_true", help="no progress bar and no per-layer table")
    return parser


def _rank_options(command: argparse.ArgumentParser, scope: str) -> None:
    command.add_argument("--rank", type=int, help=f"{scope}the new rank of every layer")
    command.add_argument("--method", choices=[m for m in METHODS if m != "fixed"],
                         help=f"{scope}choose each layer's rank from its singular values (with --threshold)")
    command.add_argument("--threshold", type=float,
                         help="sv_ratio: largest/smallest kept singular value (>= 1); "
                              "sv_cumulative, sv_fro: fraction to keep (0..1]")
    command.add_argument("--max-rank", type=int, help="cap on every layer's new rank (with --method)")


def _load(args, path) -> Adapter:
    base = load_model_dir(args.base_model) if args.base_model is not None else None
    return load_adapter(path, base_model=base, allow_pickle=args.allow_pickle, strict=args.strict)


def _disk_size(path: Path) -> int:
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files)


def _inspect(args) -> int:
    adapter = _load(args, args.file)
    summary = summarize(adapter)
    path = Path(args.file)
    if args.json:
        print(json.dumps({"file": str(path), "file_bytes": _disk_size(path), **summary}, indent=2))
        return 0
    lines = [f"file:        {path} ({size_text(_disk_size(path))} on disk)", *summary_lines(summary)]
    if args.layers:
        lines += ["", layer_table(summary)]
    print("\n".join(lines))
    return 0


def _rank_arguments(args, command: str, needed: bool) -> dict | None:
    """``resize`` keyword arguments from --rank / --method / --threshold / --max-rank, or None
    when none was given and ``needed`` is false."""
    if args.rank is not None and args.method is not None:
        raise CommandError("give --rank or --method, not both")
    if args.rank is None and args.method is None:
        if args.threshold is not None or args.max_rank is not None:
            raise CommandError("--threshold and --max-rank go with --method")
        if needed:
            raise CommandError(f"{command} needs the new rank: pass --rank R, or --method "
                               f"{'|'.join(m for m in METHODS if m != 'fixed')} with --threshold T")
        return None
    if args.method is not None and args.threshold is None:
        raise CommandError(f"--method {args.method} needs --threshold")
    if args.rank is not None and (args.threshold is not None or args.max_rank is not None):
        raise CommandError("--threshold and --max-rank go with --method, not with --rank")
    method = args.method or "fixed"
    return {"rank": args.rank, "method": method, "threshold": args.threshold, "max_rank": args.max_rank}


def _output(args, adapter: Adapter, fmt: str | None) -> tuple[Path, str]:
    """The output path and format, checked: a ``.safetensors`` path is a file; an existing
    output needs --force. ``fmt`` None: the input's own LoRA format."""
    out = Path(args.output)
    is_file = out.suffix == FILE_SUFFIX
    if fmt is None:
        fmt = _LORA_FORMAT.get(adapter.source_format, "peft")
        if fmt == "peft" and is_file:
            fmt = "diffusers"  # PEFT's keys in one file
    if fmt == "peft" and is_file:
        raise CommandError(f"{out}: --to peft writes a directory, not a {FILE_SUFFIX} file: give a directory, "
                           "or --to diffusers (the same keys in one file)")
    if fmt != "peft" and out.is_dir():
        raise CommandError(f"{out}: is a directory; --to {fmt} writes one {FILE_SUFFIX} file")
    if fmt != "peft" and not is_file:
        raise CommandError(f"{out}: --to {fmt} writes one file, and an output path not ending in "
                           f"{FILE_SUFFIX} names a PEFT directory: end it in {FILE_SUFFIX}, or --to peft")
    if fmt == "peft" and out.exists() and not out.is_dir():
        raise CommandError(f"{out}: is a file; --to peft writes a directory")
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not args.force:
        raise CommandError(f"{out}: already exists; pass --force to replace it")
    return out, fmt


def _report(report: dict[str, LayerResize]) -> str:
    rows = [[name, r.kind, "full" if r.old_rank is None else str(r.old_rank), str(r.new_rank),
             f"{r.fro_retained:.2f}", f"{r.sv_retained:.2f}"] for name, r in report.items()]
    return table(["layer", "kind", "rank", "new rank", "norm kept %", "sv sum kept %"], rows)


def _finish(args, written: list[Path], before: Adapter, after: Adapter, fmt: str,
            report: dict[str, LayerResize] | None) -> int:
    if report and not args.quiet:
        print(_report(report))
    if report:
        worst = min(report.values(), key=lambda r: r.fro_retained)
        print(f"{len(report)} layers resized; the least kept share of a layer's change: "
              f"{worst.fro_retained:.2f}% of its Frobenius norm")
    places = ", ".join(str(p) for p in written)
    print(f"wrote {places} ({fmt}): {len(after.layers)} layers, {before.source_format} -> {fmt}, "
          f"{before.num_parameters():,} -> {after.num_parameters():,} parameters")
    return 0


def _convert(args) -> int:
    adapter = _load(args, args.input)
    full = any(layer.kind != "lora" for layer in adapter.layers.values())
    kinds = sorted({layer.kind for layer in adapter.layers.values()} - {"lora"})
    options = _rank_arguments(args, f"converting {'/'.join(kinds)} layers into LoRA", needed=full)
    if options and not full:
        raise CommandError(f"{args.input} holds LoRA layers only: --rank and --method turn LoHa/LoKr layers "
                           "into LoRA here; `fastlora resize` changes LoRA ranks")
    out, fmt = _output(args, adapter, None if args.to == "lora" else args.to)
    converted, report = to_lora(adapter, **options, progress=not args.quiet) if full else (adapter, None)
    return _finish(args, save_adapter(converted, out, fmt), adapter, converted, fmt, report)


def _resize(args) -> int:
    options = _rank_arguments(args, "resize", needed=True)
    adapter = _load(args, args.input)
    out, fmt = _output(args, adapter, args.to)
    resized, report = resize(adapter, **options, progress=not args.quiet)
    return _finish(args, save_adapter(resized, out, fmt), adapter, resized, fmt, report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
