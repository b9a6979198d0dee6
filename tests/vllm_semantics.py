"""vLLM's LoRA linear written out in PyTorch (its semantics, in the inputs' dtype), the
vLLM-shaped layers of the tests and how vLLM's ``set_lora`` fills its stacked weights: shared
by ``test_vllm_plugin.py`` (without vLLM) and ``test_vllm_ops.py`` (against vLLM's ops)."""
import torch

from data import randn


def vllm_lora_linear(x, weight, bias, lora_a_stacked, lora_b_stacked, index):
    """vLLM's LoRA linear (base GEMM, then ``add_lora_linear`` with scale 1): row t with slot
    ``i = index[t] >= 0`` gets ``x_t A_ij^T B_ij^T`` in slice j's columns for every slice j
    (A_ij = lora_a_stacked[j][i, 0] ``[R, K]``, B_ij = lora_b_stacked[j][i, 0] ``[N_j, R]``);
    -1 rows get the base layer only. In the dtype of the inputs (float64 for a reference)."""
    slot, live = index.clamp(min=0).long(), (index >= 0)[:, None].to(x.dtype)
    parts = [torch.einsum("mr,mnr->mn", torch.einsum("mk,mrk->mr", x, a[slot, 0]), b[slot, 0])
             for a, b in zip(lora_a_stacked, lora_b_stacked)]
    return x @ weight.T + bias + live * torch.cat(parts, dim=1)


def fill(stacked, ranks, g, device):
    """Writes random adapters of ``ranks`` (one per slot; 0: empty) into the vLLM-shaped views
    as vLLM's set_lora does (rank r fills rows ``:r`` of A and columns ``:r`` of B), then
    refreshes each slot."""
    for slot, r in enumerate(ranks):
        for a, b in zip(stacked.lora_a_stacked, stacked.lora_b_stacked):
            if r:
                a[slot, 0, :r] = randn(r, a.shape[3], g=g, device=device, scale=a.shape[3] ** -0.5)
                b[slot, 0, :, :r] = randn(b.shape[2], r, g=g, device=device, scale=r ** -0.5)
        stacked.refresh(slot)


SLICES = {"linear": [48], "merged_qkv": [32, 16, 16], "gate_up": [24, 24]}
