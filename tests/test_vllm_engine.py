"""vLLM end to end with the plugin on (marker ``vllm``; skipped without vLLM): the tiny
Llama-style model of ``vllm_models`` serves a mixed batch (6 requests over 3 PEFT adapters of
ranks 4/8/16 with rsLoRA and different target modules, plus a base request) with every LoRA
slot full, at tensor parallel 1 and 2, and every request's greedy tokens equal PEFT's.

With every slot full, vLLM's own CPU path gives the base request the last slot's adapter
(its CPU ops index the weights with -1), so the base request also shows that fastlora's op
ran. Each engine runs in a subprocess (``vllm_engine.py``) and takes a minute or more to
start on a small CPU machine: run these sparingly."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastlora.vllm import version

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(version.unsupported(vllm.__version__) is not None,
                                 reason=f"vLLM {vllm.__version__} is outside the tested range")]

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder, PEFT's tokens per request)."""
    import vllm_models

    folder = tmp_path_factory.mktemp("vllm_model")
    tokens = vllm_models.peft_tokens(vllm_models.write(folder))
    prompts = [p for p, _ in vllm_models.REQUESTS]
    with_adapter = prompts.index(prompts[-1])  # the base request's prompt, with an adapter
    assert tokens[with_adapter] != tokens[-1]  # the adapters change the tokens
    return folder, tokens


def run_engine(folder: Path, tp: int) -> tuple[dict, str]:
    env = {**os.environ, "FASTLORA_VLLM": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if tp == 2:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    out = subprocess.run([sys.executable, str(HERE / "vllm_engine.py"), str(folder), str(tp)],
                         env=env, cwd=folder, capture_output=True, text=True, timeout=840)
    log = out.stdout + out.stderr
    result = re.search(r"^RESULT (.*)$", out.stdout, re.M)
    assert out.returncode == 0 and result, log[-6000:]
    import json

    return json.loads(result.group(1)), log


@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_batch_equals_peft(served, tp):
    folder, want = served
    result, log = run_engine(folder, tp)
    # 2 decoder layers x (qkv_proj, o_proj, gate_up_proj, down_proj); embeddings and lm_head
    # stay vLLM's. One line per worker.
    taken = re.findall(r"fastlora: (\d+) of (\d+) LoRA layers run fastlora's fused multi-adapter "
                       r"op; stays vLLM's: (.*?); never fused", log)
    assert taken == [("8", "10", "embeddings (1), lm_head (1)")] * tp, log[-6000:]
    assert result["tokens"] == want
    print(f"engine start, TP={tp}: {result['start_s']} s")
