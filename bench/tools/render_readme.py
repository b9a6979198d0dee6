"""Render README.md's "Measured" section from the result files committed under bench/results/.

Only the lines between ``<!-- measured:start -->`` and ``<!-- measured:end -->`` change, so
no figure in README is ever written by hand. For each benchmark and GPU the newest result
file is summarized (a short table, links to the full table and the plot); dry-run results
are never rendered.

    python bench/tools/render_readme.py            rewrite README.md's section
    python bench/tools/render_readme.py --check    exit 1 if README.md's section is out of date
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: see tools/__init__.py
from tables import header, markdown_table, nearest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- measured:start -->", "<!-- measured:end -->"
ORDER = ["layer", "decode", "dora", "qlora", "multi", "model", "model-4bit", "serve"]
TITLES = {"layer": "Layer: forward and backward", "decode": "Decode: three timings",
          "dora": "DoRA", "qlora": "QLoRA: bitsandbytes 4-bit base", "multi": "Multi-adapter batches", "model": "Model",
          "model-4bit": "Model: QLoRA, bitsandbytes 4-bit base",
          "serve": "Serving: decode steps and adapter paging"}
NO_RESULTS = """No GPU measurements are committed yet. `bash bench/gpu_session.sh STEP` on a GPU
machine writes them into `STEP.tgz` archives;
`python bench/tools/collect_results.py STEP.tgz ...` copies them into `bench/results/`, and
once they are committed `python bench/tools/render_readme.py` fills this section from them.
"""
INTRO = """Rendered by `python bench/tools/render_readme.py` from the result files in
`bench/results/` (the newest per benchmark and GPU). A ratio is fastlora's time over the
reference's, measured in the same run: below 1 is faster.
"""


def latest(results: Path, dry_run: bool = False) -> list[tuple[Path, dict]]:
    """The newest result file per (benchmark, GPU), in ``ORDER``; dry runs only if asked."""
    newest = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") not in ORDER or bool(data["env"].get("dry_run")) != dry_run:
            continue
        key = (data["benchmark"], data["env"]["gpu"])
        if key not in newest or data["env"]["date"] >= newest[key][1]["env"]["date"]:
            newest[key] = (path, data)
    return sorted(newest.values(), key=lambda pd: (ORDER.index(pd[1]["benchmark"]),
                                                   str(pd[1]["env"]["gpu"])))


def at(rows: list[dict], impl: str, **wanted) -> list[dict]:
    """``impl``'s rows at the values of ``wanted`` nearest to those present."""
    rows = [r for r in rows if r["impl"] == impl]
    for column, value in wanted.items():
        held = nearest({r[column] for r in rows}, value) if rows else value
        rows = [r for r in rows if r[column] == held]
    return rows


def partner(rows: list[dict], row: dict, impl: str, keys: tuple[str, ...]) -> dict:
    """The row of ``impl`` measured at the same point as ``row``."""
    return next((r for r in rows if r["impl"] == impl and all(r[k] == row[k] for k in keys)), {})


def ratio(a, b):
    return a / b if a and b else None


def layer(data: dict) -> tuple[str, list[dict], list[str]]:
    rows = data["rows"]
    keys = ("K", "N", "M", "r", "p", "adapter")
    chosen = at(rows, "fastlora", r=16, p=0.1)
    table = [{"adapter": r["adapter"], "K x N": f"{r['K']} x {r['N']}", "M": r["M"],
              "fwd vs F.linear": r["fwd/F.linear"], "fwd vs PEFT": r["fwd/peft"],
              "fwd+bwd vs F.linear": r["fwd_bwd/F.linear"], "fwd+bwd vs PEFT": r["fwd_bwd/peft"],
              "saved for backward, fastlora / PEFT":
                  ratio(r["saved_mb"], partner(rows, r, "peft", keys).get("saved_mb"))}
             for r in chosen]
    what = (f"One layer, forward and forward+backward, rank {chosen[0]['r'] if chosen else '-'}, "
            f"dropout {chosen[0]['p'] if chosen else '-'}, bf16 base.")
    return what, table, list(table[0]) if table else []


def decode(data: dict) -> tuple[str, list[dict], list[str]]:
    rows = data["rows"]
    keys = ("K", "N", "M", "r", "adapter")
    table = []
    for r in at(rows, "fastlora", r=16):
        peft, base = partner(rows, r, "peft", keys), partner(rows, r, "F.linear", keys)
        table.append({"adapter": r["adapter"], "K x N": f"{r['K']} x {r['N']}", "M": r["M"],
                      "fastlora graph us": r["graph_us"], "bound us": r["bound_us"],
                      "fastlora graph / bound": r["graph/bound"],
                      "F.linear graph / its bound": base.get("graph/bound"),
                      "fastlora eager us": r["eager_us"], "PEFT eager us": peft.get("eager_us")})
    what = ("Decode, one layer: CUDA-graph replay over layer copies that exceed L2 (weights "
            "from DRAM), the memory-traffic bound, and eager calls back to back (host time "
            "included).")
    return what, table, list(table[0]) if table else []


def dora(data: dict) -> tuple[str, list[dict], list[str]]:
    rows = data["rows"]
    keys = ("K", "N", "M", "r", "adapter")
    chosen = at(rows, "fastlora-dora", r=16)
    table = [{"adapter": r["adapter"], "K x N": f"{r['K']} x {r['N']}", "M": r["M"],
              "fwd vs PEFT DoRA": r["fwd/peft-dora"], "fwd+bwd vs PEFT DoRA": r["fwd_bwd/peft-dora"],
              "fwd+bwd vs fastlora LoRA": r["fwd_bwd/fastlora-lora"],
              "saved for backward, fastlora / PEFT":
                  ratio(r["saved_mb"], partner(rows, r, "peft-dora", keys).get("saved_mb"))}
             for r in chosen]
    what = f"One DoRA layer, rank {chosen[0]['r'] if chosen else '-'}, bf16 base."
    return what, table, list(table[0]) if table else []


def qlora(data: dict) -> tuple[str, list[dict], list[str]]:
    rows = data["rows"]
    table = [{"K x N": f"{r['K']} x {r['N']}", "M": r["M"], "fwd ms": r["fwd_ms"],
              "fwd vs 16-bit F.linear": r["fwd/F.linear"], "fwd / traffic bound": r["fwd/bound"],
              "fwd vs PEFT 4-bit": r.get("fwd/peft-4bit"),
              "fwd+bwd vs PEFT 4-bit": r.get("fwd_bwd/peft-4bit")}
             for r in rows if r["impl"] == "fastlora-4bit"]
    r = rows[0]["r"] if rows else "-"
    return (f"One LoRA layer (rank {r}) over an NF4 weight (double-quantized absmax), bf16 "
            f"compute, the 4-bit tiles decoded in the fused kernel.", table,
            list(table[0]) if table else [])


def multi(data: dict) -> tuple[str, list[dict], list[str]]:
    table = [{"M": r["M"], "adapters": r["adapters"], "assignment": r["assignment"],
              "ranks": r["ranks"], "fastlora graph us": r["graph_us"],
              "graph / bound": r["graph/bound"], "vs F.linear (graph)": r["graph/F.linear"],
              "vs PEFT (eager)": r["eager/peft"], "vs per-adapter loop (eager)": r["eager/loop"]}
             for r in data["rows"] if r["impl"] == "fastlora"]
    return ("Multi-adapter batches, one layer, a different adapter per row.", table,
            list(table[0]) if table else [])


def model(data: dict, base: str = "") -> tuple[str, list[dict], list[str]]:
    columns = ["step", "peft_ms", "fastlora_ms", "speedup", "peft_peak_gib", "fastlora_peak_gib"]
    check = data["meta"]["check"]
    return (f"A Llama-style model{base}, PEFT LoRA vs `fastlora.patch` (logits of the two agree "
            f"to {check['relative']:.1g} relative).", data["rows"], columns)


def model_4bit(data: dict) -> tuple[str, list[dict], list[str]]:
    return model(data, " whose decoder layers' linear weights are bitsandbytes NF4 "
                       "(double-quantized absmax, bf16 compute: QLoRA)")


def serve(data: dict) -> tuple[str, list[dict], list[str]]:
    rows = data["rows"]
    table = [{"rows": r["rows"], "adapters": r["adapters"], "fastlora graph ms": r["graph_ms"],
              "graph / bound": r["graph/bound"], "vs base model (graph)": r["graph/base"],
              "fastlora eager ms": r["eager_ms"], "vs PEFT mixed batch (eager)": r["eager/peft"],
              "tokens/s (graph)": r["graph_tokens_s"]}
             for r in rows if r["impl"] == "fastlora"]
    paging = next((r for r in rows if r["impl"] == "page-in"), None)
    swap = (f" Page-in of one rank-16 adapter ({paging['adapter_mb']:.1f} MiB): "
            f"{paging['page_in_ms']:.2f} ms (median)." if paging else "")
    return (f"Decode steps of a Llama-style model, a different adapter per request "
            f"(`fastlora.serve`).{swap}", table, list(table[0]) if table else [])


SUMMARIES = {"layer": layer, "decode": decode, "dora": dora, "qlora": qlora, "multi": multi, "model": model,
             "model-4bit": model_4bit, "serve": serve}


def section(path: Path, data: dict, base: Path) -> str:
    what, table, columns = SUMMARIES[data["benchmark"]](data)
    link = Path(os.path.relpath(path, base)).as_posix()
    lines = [f"### {TITLES[data['benchmark']]} ({data['env']['gpu'] or 'dry run'})", "",
             f"{what} {header(data['env'])}. Full table: [{Path(link).with_suffix('.md').name}]"
             f"({Path(link).with_suffix('.md').as_posix()})."]
    if path.with_suffix(".png").exists():
        lines[-1] += f" Plot: [{path.with_suffix('.png').name}]({Path(link).with_suffix('.png').as_posix()})."
    notes = [f"- {n}" for n in data["notes"] if n.startswith(("Sanity", "Time budget"))]
    if not data["complete"] and not any(n.startswith("- Time budget") for n in notes):
        notes.append("- The run was cut short: the table holds the points measured before.")
    lines += [""] + notes if notes else []
    lines += ["", markdown_table(table, columns) if table else "(no rows)\n"]
    return "\n".join(lines)


def render(results: Path, base: Path = ROOT, dry_run: bool = False) -> str:
    """The section's text for the result files in ``results``; links relative to ``base``."""
    found = latest(results, dry_run) if results.is_dir() else []
    if not found:
        return NO_RESULTS
    return INTRO + "".join("\n" + section(path, data, base) for path, data in found)


def replace_block(readme: str, body: str) -> str:
    """``readme`` with the text between the markers replaced by ``body``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"README must hold one {START} line followed by one {END} line")
    head, rest = readme.split(START + "\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the section is out of date")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = replace_block(text, render(args.results, args.readme.parent))
    if args.check:
        if new != text:
            print(f"{args.readme}: the Measured section is out of date; run "
                  "python bench/tools/render_readme.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    print(f"rendered {args.readme}'s Measured section from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
