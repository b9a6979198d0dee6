"""Result tables without torch: the header line of a result, table cells, markdown tables,
and the slice of rows a plot or README summary shows (used by common, plot, render_readme)."""
from __future__ import annotations


def header(env: dict) -> str:
    """One line naming the GPU, the software and the date of a result."""
    where = ("**DRY RUN on the CPU (Triton interpreter, tiny shapes): not a measurement**"
             if env.get("dry_run") else f"GPU: {env['gpu']}")
    return (f"{where}; torch {env['torch']}, Triton {env['triton']}, CUDA {env.get('cuda')}, "
            f"peft {env.get('peft')}, transformers {env.get('transformers')}; date {env['date']}")


def markdown(data: dict, preamble: str) -> str:
    """The result as markdown: header, preamble, notes, the table, then each appendix (a
    title and verbatim lines) in a code block."""
    notes = "".join(f"\n- {n}" for n in data["notes"])
    appendices = "".join(f"\n### {title}\n\n```\n" + "\n".join(lines) + "\n```\n"
                         for title, lines in data.get("appendix", {}).items())
    return (f"{header(data['env'])}\n\n{preamble}\n{notes}\n\n"
            f"{markdown_table(data['rows'], data['columns'])}{appendices}")


def fmt(v) -> str:
    """A table cell: three significant digits, whole numbers from 1000 on."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def nearest(values, wanted):
    """The value in ``values`` nearest to ``wanted`` (numbers), or ``wanted`` itself."""
    numbers = [v for v in values if isinstance(v, (int, float))]
    if isinstance(wanted, (int, float)) and numbers:
        return min(numbers, key=lambda v: (abs(v - wanted), v))
    return wanted if wanted in values else sorted(values, key=str)[0]


def sliced(rows: list[dict], spec: dict) -> tuple[list[dict], dict]:
    """The rows of ``spec["impl"]`` at the slice's values; returns them and the values."""
    rows = [r for r in rows if r.get("impl") == spec["impl"]]
    held = {}
    for column, wanted in spec.get("slice", {}).items():
        present = {r[column] for r in rows if column in r}
        if present:
            held[column] = nearest(present, wanted)
            rows = [r for r in rows if r.get(column) == held[column]]
    return rows, held
