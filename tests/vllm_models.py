"""A tiny Llama-style model and three PEFT adapters written to a folder (no download), and
PEFT's greedy tokens for them: the reference of the vLLM tests (``test_vllm_*``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# GQA (4 query heads, 2 KV heads: QKV's slices differ in width), head size 32 (vLLM's CPU
# attention needs one of its sizes), a 256-token vocabulary
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# name -> (rank, alpha, target modules): ragged ranks, rsLoRA, different targets; the
# largest rank is vLLM's max_lora_rank
ADAPTERS = {
    "attn": (4, 8, ["q_proj", "v_proj"]),
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp": (16, 8, ["o_proj", "gate_proj", "down_proj"]),
}
MAX_RANK = 16
# prompts (token ids) and the adapter of each request (None: the base model)
REQUESTS = [([5, 17, 42, 99, 7], "attn"), ([12, 8, 33], "all"), ([77, 3, 150, 21, 9, 64], "mlp"),
            ([200, 11], "attn"), ([5, 17, 42], "all"), ([31, 31, 90, 4], "mlp"),
            ([5, 17, 42, 99, 7], None)]
NEW_TOKENS = 6


def write(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The base model in ``folder/base`` and each adapter in ``folder/<name>`` (random
    lora_B, so every adapter changes the tokens); returns {name: path}, "base" included."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(folder / "base")
    paths = {"base": folder / "base"}
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed + 1 + i)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                 use_rslora=True, init_lora_weights=False)
        peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folder / "base"),
                            config).save_pretrained(folder / name)
        paths[name] = folder / name
    return paths


def peft_tokens(paths: dict[str, Path]) -> list[list[int]]:
    """PEFT's greedy ``NEW_TOKENS`` tokens of every request of ``REQUESTS`` (float32, CPU)."""
    import peft
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    names = list(ADAPTERS)
    model = peft.PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    model.eval()
    out = []
    for prompt, adapter in REQUESTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            else:
                model.set_adapter(adapter)
                got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(got[0, len(prompt):].tolist())
    return out


if __name__ == "__main__":
    import sys

    paths = write(Path(sys.argv[1]))
    print(json.dumps(peft_tokens(paths)))
