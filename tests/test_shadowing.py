"""The checkout's top-level ``kernels/`` folder never shadows the installed package named
``kernels`` (Hugging Face's kernel hub, imported by transformers >= 5.25 and bitsandbytes).

Every case runs in a subprocess started from the repository root, where ``python -c`` and
``python -m`` put the checkout first on sys.path, with a stub package named ``kernels`` on
PYTHONPATH in place of the real one (no network, whatever is installed)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stub(tmp_path) -> Path:
    pkg = tmp_path / "stub" / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("MARK = 'stub'\nclass CUDAProperties:\n    pass\n")
    (pkg / "utils.py").write_text("WHERE = 'stub submodule'\n")
    return pkg.parent


def _python(*args: str, pythonpath: list[Path] = (), cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_python_c_from_the_root_gets_the_installed_kernels(stub):
    r = _python("-c", "import kernels, kernels.utils; from kernels import CUDAProperties; "
                      "print(kernels.MARK, kernels.utils.WHERE, kernels.__file__)", pythonpath=[stub])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stub stub submodule " + str(stub)), r.stdout


def test_checkout_on_pythonpath_keeps_both_packages_apart(stub):
    """As bench/gpu_session.sh --dry-run runs: the checkout first on PYTHONPATH."""
    code = ("import kernels, fastlora.kernels as fk; "
            "print(kernels.MARK, fk.fused_linear.__module__, fk.__name__)")
    r = _python("-c", code, pythonpath=[ROOT, stub])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["stub", "fastlora.kernels.linear", "fastlora.kernels"]


def test_fastlora_first_then_kernels(stub):
    r = _python("-c", "import fastlora, kernels; print(kernels.MARK)", pythonpath=[stub])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "stub"


def test_python_m_fastlora_from_the_root(stub):
    r = _python("-m", "fastlora", "--help", pythonpath=[stub])
    assert r.returncode == 0, r.stderr
    assert "usage: fastlora" in r.stdout


def test_no_installed_kernels_looks_like_a_shadowing_folder():
    """With none installed, ``import kernels`` gives what a folder without ``__init__.py``
    gives: an empty namespace package, which transformers' availability check (find_spec, then
    import without metadata) reads as "not installed"; its attributes name fastlora.kernels."""
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "import importlib, importlib.util\n"
            "assert importlib.util.find_spec('kernels') is not None\n"
            "m = importlib.import_module('kernels')\n"
            "print(getattr(m, '__version__', 'N/A'), getattr(m, '__file__', None), m.__path__)\n"
            "try:\n    from kernels import get_kernel\n"
            "except ImportError as e:\n    print(type(e).__name__)\n"
            "try:\n    import kernels.utils\n"
            "except ModuleNotFoundError as e:\n    print(e.name)\n"
            "try:\n    m.get_kernel\n"
            "except AttributeError as e:\n    print(e)\n")
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == ["N/A None []", "ImportError", "kernels.utils"], lines
    assert "no package named 'kernels' is installed" in lines[3] and "fastlora.kernels" in lines[3]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_peft_transformers_and_bitsandbytes_import_from_the_root():
    """With the real packages: transformers' hub-kernels integration and bitsandbytes import
    ``kernels`` themselves (what failed before the hand-over)."""
    mods = ["peft", "transformers"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        mods.append("bitsandbytes")
    code = f"import {', '.join(mods)}\n"
    if importlib.util.find_spec("kernels") is not None and _python(
            "-c", "import transformers.integrations.hub_kernels", cwd=Path("/")).returncode == 0:
        code += "import transformers.integrations.hub_kernels\n"
    code += "import sys; m = sys.modules.get('kernels'); print(getattr(m, '__file__', None))"
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert not r.stdout.strip().startswith(str(ROOT / "kernels")), r.stdout
