"""README.md as a user meets it: every ```python block runs (on the CPU here, with the kernels in
Triton's interpreter as tests/conftest.py sets up), and the text holds what CI and readers rely on."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, monkeypatch):
    """Each block alone, in a fresh namespace, as a user would paste it (the distributed
    example's rendezvous on a free port, so that a concurrent run cannot collide with it)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})


def test_first_lines_are_the_setup_commands():
    lines = README.splitlines()
    assert lines[2] == '    pip install torch==2.13.0 && pip install -e ".[peft]" && python -m fastlora demo'
    assert lines[3] == '    pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q tests'


def test_measured_section_markers():
    section = README.split("## Measured", 1)[1]
    assert section.index("<!-- measured:start -->") < section.index("<!-- measured:end -->")


@pytest.mark.parametrize("phrase", ["shared/design.md", "design note", "lent GPU", "lent gpu"])
def test_speaks_of_nothing_a_user_lacks(phrase):
    assert phrase not in README


def test_license_and_design_doc_exist():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "docs" / "design.md").is_file() and "(docs/design.md)" in README
