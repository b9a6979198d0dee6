"""kernels/ installs as fastlora.kernels and never as a top-level ``kernels`` module."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastlora.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_fastlora_kernels():
    assert Path(fastlora.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    top = importlib.metadata.distribution("fastlora").read_text("top_level.txt")
    assert top is None or top.split() == ["fastlora"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel a user installs, built from a copy (no build/ folder left in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info",
                                                            "__pycache__", ".pytest_cache", ".whl"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp), str(src)], check=True, timeout=600)
    return next(tmp.glob("fastlora-*.whl"))


def test_wheel_holds_only_the_fastlora_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    kernel_sources = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert {n.split("/")[-1] for n in names if n.startswith("fastlora/kernels/")} >= kernel_sources
    assert "fastlora/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package"
    assert all(n.startswith(("fastlora/", "fastlora-")) for n in names), names
    assert any(n.startswith("fastlora-") and n.endswith("/LICENSE") for n in names), names


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    """A fresh venv holding the wheel (its dependencies seen through a .pth line to this
    environment's site-packages, whose own .pth files, the editable install's among them, are
    not processed there), run from a directory outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install",
                    "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    adapter = tmp_path / "adapter.safetensors"
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_mid_proj.lora_down.weight": torch.randn(4, 16, generator=g),
               "lora_unet_mid_proj.lora_up.weight": torch.randn(24, 4, generator=g),
               "lora_unet_mid_proj.alpha": torch.tensor(8.0)}, str(adapter))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*cmd):
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        return r.stdout

    where = run(str(bin_dir / "python"), "-c", "import fastlora.kernels as k; print(k.__file__)")
    assert where.strip().startswith(str(site)), where
    assert "usage: fastlora" in run(str(bin_dir / "python"), "-m", "fastlora", "--help")
    shown = run(str(bin_dir / "fastlora"), "inspect", str(adapter))
    assert "kohya" in shown and "layers:      1 (1 linear" in shown, shown
