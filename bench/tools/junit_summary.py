"""Summary of pytest JUnit XML reports: one line per report, the failing tests, a total.

    python bench/tools/junit_summary.py DIR        (every *.xml in DIR)
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

COUNTS = ("tests", "failures", "errors", "skipped")


def summarize(folder: Path) -> str:
    total = dict.fromkeys(COUNTS, 0)
    lines, failing = [], []
    for report in sorted(folder.glob("*.xml")):
        root = ET.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        counts = {c: sum(int(s.get(c, 0)) for s in suites) for c in COUNTS}
        for c in COUNTS:
            total[c] += counts[c]
        lines.append(f"{report.stem}: " + ", ".join(f"{counts[c]} {c}" for c in COUNTS))
        for case in root.iter("testcase"):
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                message = (problem.get("message") or "").splitlines()[:1]
                failing.append(f"  {problem.tag.upper()} {case.get('classname')}::"
                               f"{case.get('name')}: {message[0][:160] if message else ''}")
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    lines += failing
    lines.append(f"total: {passed} passed, {total['failures']} failed, {total['errors']} errors, "
                 f"{total['skipped']} skipped, in {len(lines) - len(failing)} report(s)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))
