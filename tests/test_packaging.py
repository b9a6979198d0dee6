"""kernels/ installs as fastlora.kernels and never as a top-level ``kernels`` module."""
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import fastlora.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_fastlora_kernels():
    assert Path(fastlora.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    top = importlib.metadata.distribution("fastlora").read_text("top_level.txt")
    assert top is None or top.split() == ["fastlora"]


def test_wheel_holds_only_the_fastlora_package(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ folder in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info",
                                                            "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, timeout=600)
    wheel = next(tmp_path.glob("fastlora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastlora/kernels/linear.py" in names
    assert "fastlora/kernels/__init__.py" in names
    assert all(n.startswith(("fastlora/", "fastlora-")) for n in names), names
