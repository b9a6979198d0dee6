"""Copy the result files of GPU-run archives (``STEP.tgz`` from bench/gpu_session.sh) into
bench/results/, ready to commit and render into README (bench/tools/render_readme.py).

Takes each benchmark's ``.json`` with its ``.md`` and ``.png``; dry-run results are refused.

    python bench/tools/collect_results.py layer.tgz multi.tgz ... [--results DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def collect(archive: Path, results: Path) -> list[Path]:
    """The result files of ``archive`` copied into ``results``; returns the files written."""
    written = []
    with tarfile.open(archive) as tar:
        members = {Path(m.name): m for m in tar.getmembers() if m.isfile()}
        for path, member in members.items():
            if path.suffix != ".json":
                continue
            data = json.loads(tar.extractfile(member).read())
            if "benchmark" not in data:
                continue
            if data["env"].get("dry_run"):
                raise ValueError(f"{archive}: {path.name} is a dry-run result, not a measurement")
            results.mkdir(parents=True, exist_ok=True)
            for suffix in (".json", ".md", ".png"):
                if path.with_suffix(suffix) in members:
                    target = results / path.with_suffix(suffix).name
                    target.write_bytes(tar.extractfile(members[path.with_suffix(suffix)]).read())
                    written.append(target)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("archives", type=Path, nargs="+", help="STEP.tgz files of a GPU run")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = p.parse_args(argv)
    for archive in args.archives:
        for path in collect(archive, args.results):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
