"""README's Measured section comes from committed result files only
(bench/tools/render_readme.py)."""
import io
import json
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from tools.collect_results import collect
from tools.render_readme import END, NO_RESULTS, START, main, render, replace_block


def env(gpu="NVIDIA H100 80GB HBM3", date="2026-11-20", dry_run=False):
    return {"gpu": None if dry_run else gpu, "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
            "peft": "0.17", "transformers": "5.17.0", "date": date, "dry_run": dry_run}


def result(benchmark, rows, notes=(), complete=True, **kw):
    return {"benchmark": benchmark, "env": env(**kw), "complete": complete, "notes": list(notes),
            "meta": {"check": {"relative": 0.002}}, "columns": [], "plot": None, "rows": rows}


def layer_rows(fwd_vs_peft):
    point = dict(K=4096, N=4096, M=2048, r=16, p=0.1, adapter="bf16")
    return [point | dict(impl="fastlora", **{"fwd/F.linear": 1.1, "fwd/peft": fwd_vs_peft,
                                               "fwd_bwd/F.linear": 1.3, "fwd_bwd/peft": 0.5},
                         saved_mb=10.0),
            point | dict(impl="peft", saved_mb=40.0),
            point | dict(impl="fastlora", r=64, **{"fwd/F.linear": 9.9, "fwd/peft": 9.9,
                                                    "fwd_bwd/F.linear": 9.9, "fwd_bwd/peft": 9.9},
                         saved_mb=1.0)]


def write(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(data))


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    write(folder, "layer-h100-2026-11-19.json", result("layer", layer_rows(0.77), date="2026-11-19"))
    write(folder, "layer-h100-2026-11-20.json", result("layer", layer_rows(0.42)))
    write(folder, "layer-cpu-dry-run-2026-11-21.json",
          result("layer", layer_rows(0.01), dry_run=True, date="2026-11-21"))
    point = dict(K=4096, N=4096, M=64, adapters=32, present=32, assignment="distinct", ranks="16",
                 copies=3)
    write(folder, "multi-h100-2026-11-20.json", result("multi", [
        point | {"impl": "F.linear", "graph_us": 12.0, "graph/bound": 1.04},
        point | {"impl": "fastlora", "graph_us": 15.5, "graph/bound": 1.07, "graph/F.linear": 1.29,
                 "eager/peft": 0.08, "eager/loop": 0.2}],
        notes=["Sanity: F.linear graph time / its memory-traffic bound is at least 1.04 over 1 "
               "shapes (expected >= ~1): ok."]))
    (folder / "multi-h100-2026-11-20.png").write_bytes(b"png")
    write(folder, "model-h100-2026-11-20.json", result("model", complete=False, rows=[
        {"step": "training step (fwd+bwd)", "peft_ms": 300.0, "fastlora_ms": 200.0, "speedup": 1.5,
         "peft_peak_gib": 20.0, "fastlora_peak_gib": 15.0}]))
    write(folder, "model-4bit-h100-2026-11-20.json", result("model-4bit", rows=[
        {"step": "training step (fwd+bwd)", "peft_ms": 410.0, "fastlora_ms": 250.0, "speedup": 1.64,
         "peft_peak_gib": 9.0, "fastlora_peak_gib": 6.5}]))
    q4 = dict(K=4096, N=4096, M=16, r=16)
    write(folder, "qlora-h100-2026-11-20.json", result("qlora", [
        q4 | {"impl": "F.linear", "fwd_ms": 0.02},
        q4 | {"impl": "fastlora-4bit", "fwd_ms": 0.009, "fwd/F.linear": 0.45, "fwd/bound": 1.2,
              "fwd/peft-4bit": 0.11, "fwd_bwd/peft-4bit": 0.6}]))
    return folder


def test_renders_the_newest_real_result_per_benchmark(results, tmp_path):
    text = render(results, tmp_path)
    layer, qlora, multi, model, model4 = (
        text.index(f"### {t}") for t in ("Layer: forward and backward", "QLoRA", "Multi-adapter",
                                         "Model (", "Model: QLoRA, bitsandbytes 4-bit base ("))
    assert layer < qlora < multi < model < model4
    assert "| 4096 x 4096 | 16 | 0.009 | 0.45 | 1.2 | 0.11 | 0.6 |" in text
    assert "| 0.42 |" in text and "0.77" not in text  # the newer of two files
    assert "0.01" not in text and "DRY RUN" not in text  # dry runs are never rendered
    assert "9.9" not in text  # the summary holds r=16 only
    assert "| bf16 | 4096 x 4096 | 2048 | 1.1 | 0.42 | 1.3 | 0.5 | 0.25 |" in text  # saved 10/40
    assert "[layer-h100-2026-11-20.md](results/layer-h100-2026-11-20.md)" in text
    assert "[multi-h100-2026-11-20.png](results/multi-h100-2026-11-20.png)" in text
    assert "- Sanity: F.linear graph time" in text
    assert "| 64 | 32 | distinct | 16 | 15.5 | 1.07 | 1.29 | 0.08 | 0.2 |" in text
    assert "| training step (fwd+bwd) | 300 | 200 | 1.5 | 20 | 15 |" in text
    assert text.count("| training step (fwd+bwd) | 410 | 250 | 1.64 | 9 | 6.5 |") == 1
    assert text[model4:].index("bitsandbytes NF4") < text[model4:].index("| 410 |")
    assert "[model-4bit-h100-2026-11-20.md](results/model-4bit-h100-2026-11-20.md)" in text
    assert text.count("- The run was cut short") == 1  # the model run, killed by its timeout
    assert "GPU: NVIDIA H100 80GB HBM3; torch 2.11.0, Triton 3.6.0" in text


def test_no_results(tmp_path):
    assert render(tmp_path / "missing", tmp_path) == NO_RESULTS
    write(tmp_path / "dry", "layer-cpu.json", result("layer", layer_rows(0.5), dry_run=True))
    assert render(tmp_path / "dry", tmp_path) == NO_RESULTS


def test_rewrites_only_the_marked_block(results, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# title\n\n## Measured\n\n", "\n## Next\n\ntext\n"
    readme.write_text(f"{before}{START}\nold figures\n{END}{after}")
    assert main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert main(["--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == f"{before}{START}\n{render(results, tmp_path)}{END}{after}"
    assert main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    with pytest.raises(ValueError, match="measured:start"):
        replace_block("no markers here", "x")


def test_readme_block_is_the_rendering_of_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert replace_block(readme, render(ROOT / "bench" / "results", ROOT)) == readme, \
        "README's Measured section is out of date: run python bench/tools/render_readme.py"


def archive(path: Path, files: dict) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_collects_the_result_files_of_a_gpu_run(tmp_path):
    measured = json.dumps(result("layer", layer_rows(0.42))).encode()
    step = archive(tmp_path / "layer.tgz", {
        "layer/layer-h100-2026-11-20.json": measured, "layer/layer-h100-2026-11-20.md": b"table",
        "layer/layer-h100-2026-11-20.png": b"png", "layer/environment.txt": b"env",
        "layer/session.log": b"log", "layer/other.json": b"{}"})
    results = tmp_path / "results"
    written = collect(step, results)
    assert sorted(p.name for p in written) == sorted(p.name for p in results.iterdir()) == [
        "layer-h100-2026-11-20.json", "layer-h100-2026-11-20.md", "layer-h100-2026-11-20.png"]
    assert "| 0.42 |" in render(results, tmp_path)
    dry = archive(tmp_path / "dry.tgz", {"layer/layer-cpu.json": json.dumps(
        result("layer", layer_rows(0.5), dry_run=True)).encode()})
    with pytest.raises(ValueError, match="dry-run result"):
        collect(dry, tmp_path / "refused")
