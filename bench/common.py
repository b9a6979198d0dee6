"""Shared benchmark plumbing: environment header, saved-tensor accounting, result files."""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import torch


def environment() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }


def saved_bytes(fn) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn()`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def peak_bytes(fn) -> int:
    """Peak CUDA memory above the starting point while ``fn()`` runs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def write_results(out_dir: str | Path, stem: str, env: dict, rows: list[dict],
                  columns: list[str], preamble: str) -> Path:
    """Write ``<stem>-<gpu>-<date>.json`` and ``.md`` (environment, preamble, a table of
    ``columns``), say where; returns the JSON path."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"] or "cpu").strip("-").lower()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-{gpu}-{env['date']}.json"
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    header = (f"GPU: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
              f"date {env['date']}\n\n")
    path.with_suffix(".md").write_text(header + preamble + "\n\n" + markdown_table(rows, columns))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return path


def print_row(row: dict) -> None:
    """One measured row as ``key=value`` pairs, as it is measured."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
