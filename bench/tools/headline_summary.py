"""The headline step's figures on one page: for each benchmark result file in a folder, the
rows of fastlora's implementation with the ratios that answer the headline's questions
(each measured side by side in the same run), then the GPU tests' JUnit totals.

    python bench/tools/headline_summary.py DIR        (prints markdown)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: see tools/__init__.py
from tables import header, markdown_table  # noqa: E402
from tools.junit_summary import summarize  # noqa: E402

# benchmark -> (the implementation's rows shown, the columns that place them, the ratios)
HEADLINE = {
    "layer": ("fastlora", ["K", "N", "M", "r", "p", "adapter", "choice"],
              ["fwd/F.linear", "fwd_bwd/F.linear", "fwd/peft", "fwd_bwd/peft"]),
    "dora": ("fastlora-dora", ["K", "N", "M", "r", "adapter"],
             ["fwd/peft-dora", "fwd_bwd/peft-dora", "fwd/fastlora-lora",
              "fwd_bwd/fastlora-lora"]),
    "multi": ("fastlora", ["M", "adapters", "ranks"],
              ["eager/peft", "graph/bound", "eager/bound", "graph/F.linear"]),
    "qlora": ("fastlora-4bit", ["K", "N", "M", "r"],
              ["fwd/F.linear", "fwd/peft-4bit", "fwd_bwd/peft-4bit", "fwd/bound"]),
}
QUESTIONS = {
    "layer": "fused LoRA vs cuBLAS F.linear alone and vs PEFT (below 1: faster)",
    "dora": "DoRA vs PEFT's DoRA and vs fastlora's LoRA",
    "multi": "multi-adapter decode vs PEFT's mixed batch and vs the memory-traffic bound",
    "qlora": "4-bit NF4 forward vs 16-bit F.linear and PEFT's Linear4bit",
}


def section(data: dict) -> list[str]:
    impl, place, ratios = HEADLINE[data["benchmark"]]
    lines = [f"## {data['benchmark']}: {QUESTIONS[data['benchmark']]}", "", header(data["env"])
             + ("" if data["complete"] else "; INCOMPLETE (time budget or failure)"), ""]
    lines.append(markdown_table([r for r in data["rows"] if r.get("impl") == impl],
                                place + ratios))
    return lines + [f"- {note}" for note in data.get("notes", [])] + [""]


def summary(folder: Path) -> str:
    lines = ["# Headline", ""]
    found = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") in HEADLINE:
            found[data["benchmark"]] = data
    for name in HEADLINE:
        lines += section(found[name]) if name in found else [f"## {name}: no result file", ""]
    tests = folder / "tests"
    lines += ["## GPU tests (-m gpu_smoke)", ""]
    lines += summarize(tests).splitlines() if list(tests.glob("*.xml")) else ["no JUnit report"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])), end="")
