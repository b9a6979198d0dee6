"""bench/gpu_session.sh, the GPU run in steps: its CPU dry run goes through every step,
benchmark script, result file, plot and archive; without a GPU nothing claims a measurement."""
import importlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from tools.render_readme import TITLES, render

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def session(*args, out: Path, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    env = os.environ | {"OUT": str(out), "PYTHON": sys.executable} | env
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


OTHER_STEPS = ("tests", "layer", "multi", "qlora", "model", "serve", "vllm", "sanitize")


@no_gpu  # on a GPU machine the steps themselves run; this CPU check would only cost time
def test_dry_run_of_the_whole_gpu_run(tmp_path):
    """Every step but the headline (test_dry_run_of_the_headline covers it)."""
    out = tmp_path / "out"
    done = session("--dry-run", *OTHER_STEPS, out=out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "layer.tgz", "model.tgz", "multi.tgz", "qlora.tgz", "sanitize.tgz", "serve.tgz",
        "session.log", "tests.tgz", "vllm.tgz"]
    unpacked = tmp_path / "unpacked"
    names = {}
    for archive in out.glob("*.tgz"):
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
            names[archive.stem] = {Path(n).name for n in tar.getnames()}
    for step, wanted in {"tests": {"gpu.xml", "gpu.log", "summary.txt"},
                         "sanitize": {"calls.log"},
                         "layer": {"layer-cpu-dry-run-*.png", "dora-cpu-dry-run-*.png",
                                   "decode-cpu-dry-run-*.md"},
                         "multi": {"multi-cpu-dry-run-*.png", "multi-cpu-dry-run-*.md"},
                         "model": {"model-cpu-dry-run-*.md"},
                         "serve": {"serve-cpu-dry-run-*.md"},
                         "vllm": {"vllm-cpu-dry-run-*.md"},
                         "qlora": {"qlora-cpu-dry-run-*.md", "model-4bit-cpu-dry-run-*.md"}}.items():
        assert {"environment.txt", "session.log"} <= names[step]
        for pattern in wanted:
            assert list((unpacked / step).glob(pattern)), (step, pattern, names[step])
    assert "every kernel family ran and checked" in (unpacked / "sanitize" / "calls.log").read_text()
    summary = (unpacked / "tests" / "summary.txt").read_text()
    assert "gpu: " in summary and "tests collected" in summary

    results = tmp_path / "results"
    results.mkdir()
    for path in unpacked.glob("*/*.json"):
        data = json.loads(path.read_text())
        assert data["env"]["dry_run"] and data["complete"] and data["rows"], path
        path.rename(results / path.name)
    rendered = render(results, tmp_path, dry_run=True)  # the renderer reads what the scripts write
    for title in TITLES.values():
        assert f"### {title} (dry run)" in rendered
    assert render(results, tmp_path) == render(tmp_path / "none", tmp_path)  # never a dry run


@no_gpu
def test_dry_run_of_the_headline(tmp_path):
    """The headline step on the CPU: the kernels compiled ahead (two configs, for sm_90,
    then found in Triton's cache), every benchmark of it with the headline's flags, the
    gpu_smoke tests collected, the summary page; at most 8 files come back."""
    out = tmp_path / "out"
    done = session("--dry-run", "headline", out=out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["headline.md", "headline.tgz", "session.log"]
    with tarfile.open(out / "headline.tgz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    step = tmp_path / "unpacked" / "headline"
    precompile = (step / "precompile.log").read_text()
    assert "precompile: 2 of " in precompile and "(sm_90, dry run); 0 failed" in precompile
    assert "0 new cache entries (hits)" in precompile
    for name in ("layer", "dora", "multi", "qlora"):
        data = json.loads(next(step.glob(f"{name}-cpu-dry-run-*.json")).read_text())
        assert data["env"]["dry_run"] and data["complete"] and data["rows"], name
        if name == "layer":  # --impls and --dropout
            assert {r["impl"] for r in data["rows"]} == {"fastlora", "F.linear", "peft"}
            assert {r["p"] for r in data["rows"]} == {0.0, 0.1}
            assert all(r["choice"] for r in data["rows"] if r["impl"] == "fastlora")
        if name == "multi":  # --decode-only
            assert {r["assignment"] for r in data["rows"]} == {"distinct"}
    smoke = (step / "tests" / "gpu_smoke.log").read_text()
    assert "tests collected" in smoke and (step / "tests" / "gpu_smoke.xml").exists()
    page = (out / "headline.md").read_text()
    assert page == (step / "headline.md").read_text()
    for title in ("## layer: ", "## dora: ", "## multi: ", "## qlora: ", "## GPU tests"):
        assert title in page
    assert "DRY RUN" in page and "| fastlora" not in page  # rows by their ratios


def test_lists_the_steps_in_order_of_value_and_refuses_unknown_ones(tmp_path):
    listing = session(out=tmp_path)
    assert listing.returncode == 0
    listed = [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["headline", *OTHER_STEPS]
    unknown = session("benchmarks", out=tmp_path)
    assert unknown.returncode == 2 and "unknown step 'benchmarks'" in unknown.stderr


def test_help_says_how_to_fetch_the_wheels(tmp_path):
    helped = session("--help", out=tmp_path)
    assert helped.returncode == 0
    assert ("pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: \\\n"
            "        --platform manylinux_2_24_x86_64 --python-version 3.12 -d .whl"
            in helped.stdout)


@no_gpu
def test_gpu_steps_refuse_to_run_without_cuda(tmp_path):
    done = session("layer", out=tmp_path)
    assert done.returncode == 1 and "no CUDA device" in done.stdout
    assert not list(tmp_path.glob("*.tgz"))


@no_gpu
@pytest.mark.parametrize("script", ["bench_layer", "bench_dora", "bench_decode", "bench_multi",
                                    "bench_model", "bench_serve", "bench_qlora", "bench_vllm",
                                    "tools.sanitize_calls"])
def test_benchmarks_exit_non_zero_when_nothing_is_measured(script, tmp_path):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path)] if script != "tools.sanitize_calls" else [])
    assert "no CUDA device" in str(exit_.value.code) and "nothing was measured" in str(exit_.value.code)
    assert not list(tmp_path.iterdir())


def hide_bitsandbytes(folder: Path) -> Path:
    """A folder whose ``bitsandbytes`` package fails to import, as where it is not installed."""
    (folder / "bitsandbytes").mkdir(parents=True)
    (folder / "bitsandbytes" / "__init__.py").write_text(
        "raise ImportError('No module named bitsandbytes (hidden by the test)')\n")
    return folder


@no_gpu
def test_qlora_step_skips_the_4bit_model_without_bitsandbytes(tmp_path):
    hidden = hide_bitsandbytes(tmp_path / "site")
    done = session("--dry-run", "qlora", out=tmp_path / "out", PYTHONPATH=str(hidden))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "the 4-bit model benchmark (bench_model.py --quant4) is skipped" in done.stdout
    with tarfile.open(tmp_path / "out" / "qlora.tgz") as tar:
        names = [Path(n).name for n in tar.getnames()]
    assert any(n.startswith("qlora-cpu-dry-run") for n in names)
    assert not any(n.startswith("model-4bit") for n in names)


def test_quant4_model_needs_bitsandbytes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes: ImportError
    main = __import__("bench_model").main
    with pytest.raises(SystemExit) as exit_:
        main(["--quant4", "--dry-run", "--out", str(tmp_path / "out")])
    message = str(exit_.value.code)
    assert "--quant4 needs bitsandbytes" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


@no_gpu
def test_benchmark_exit_status_from_the_shell(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_layer.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "pass --dry-run" in done.stderr
