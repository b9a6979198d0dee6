"""PNG plots of benchmark results: time ratios (fastlora / a reference) against one column.

A result JSON (``common.Results``) carries its plot's specification:

    {"x": "M",                        column on the x axis (log scale)
     "impl": "fastlora",              the rows plotted
     "series": ["K", "N"],            one line per distinct value of these columns
     "slice": {"r": 16, "p": 0.1},    held fixed, at the present value nearest to these
     "panels": [["forward", ["fwd/F.linear", "fwd/peft"]], ...]}   one panel per entry

    python bench/tools/plot.py RESULT.json|DIR ...     (re)draws the PNG beside each JSON
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: see tools/__init__.py
from tables import header, sliced  # noqa: E402

STYLES = ["-", "--", ":", "-."]


def draw(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    spec = data["plot"]
    rows, held = sliced(data["rows"], spec)
    panels = spec["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    series = sorted({tuple(r[c] for c in spec["series"]) for r in rows}, key=str)
    for ax, (title, columns) in zip(axes[0], panels):
        for i, key in enumerate(series):
            label = " ".join(f"{c}={v}" for c, v in zip(spec["series"], key))
            points = sorted((r[spec["x"]], r) for r in rows
                            if tuple(r[c] for c in spec["series"]) == key)
            for style, column in zip(STYLES, columns):
                xy = [(x, r[column]) for x, r in points if r.get(column)]
                if xy:
                    ax.plot(*zip(*xy), style, marker="o", color=f"C{i}",
                            label=f"{label}: {column}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r[spec["x"]] for r in rows}))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(spec["x"])
        ax.set_ylabel(f"{spec['impl']} time / reference time (below 1: faster)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fixed = ", ".join(f"{c}={v}" for c, v in held.items())
    fig.suptitle(f"{data['benchmark']}" + (f" ({fixed})" if fixed else "") + "\n"
                 + header(data["env"]).replace("**", ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(json_path: Path) -> list[Path]:
    """Draw ``json_path``'s plot beside it (``.png``); returns the files written."""
    data = json.loads(Path(json_path).read_text())
    if not data.get("plot") or not data["rows"]:
        return []
    return [draw(data, Path(json_path).with_suffix(".png"))]


def main(argv=None) -> int:
    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    for f in files:
        for png in plot_file(f):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
