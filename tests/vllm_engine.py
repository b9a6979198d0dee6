"""Runs vLLM (CPU build) on the tiny model of ``vllm_models`` in its own process and prints
one JSON line: the greedy tokens of every request of ``vllm_models.REQUESTS`` and the
seconds the engine took to start. The vLLM tests run it as a subprocess (vLLM starts
worker processes of its own; a pytest process should not host them).

usage: python tests/vllm_engine.py FOLDER TP
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from vllm_models import ADAPTERS, MAX_RANK, NEW_TOKENS, REQUESTS  # noqa: E402


def main(folder: Path, tp: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    llm = LLM(model=str(folder / "base"), dtype="float32", enforce_eager=True,
              skip_tokenizer_init=True, enable_lora=True, max_loras=len(ADAPTERS),
              max_lora_rank=MAX_RANK, max_model_len=64, max_num_seqs=len(REQUESTS),
              tensor_parallel_size=tp, seed=0)
    started = time.perf_counter() - start
    ids = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in REQUESTS]
    loras = [LoRARequest(a, ids[a], str(folder / a)) if a else None for _, a in REQUESTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            detokenize=False)
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps({"tokens": tokens, "start_s": round(started, 2)}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
