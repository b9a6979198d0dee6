"""Per-dtype tolerances for comparisons against the fp32/fp64 reference.

Errors are measured relative to the reference's scale: ``|got - ref| <= atol + rtol * |ref|``
with atol taken relative to max|ref|, since LoRA outputs are sums over K terms.
"""
import torch

TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=2e-2),
}


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Compare ``got`` (computed in ``dtype``) with an fp32/fp64 reference."""
    tol = TOLERANCES[dtype]
    ref = ref.detach().double()
    got = got.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = ref.abs().max().item() or 1.0
    err = (got - ref).abs()
    bound = tol["atol"] * scale + tol["rtol"] * ref.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, (f"{what}: max error {err.max().item():.3g} exceeds tolerance "
                        f"(scale {scale:.3g}, {tol}) for {dtype}")
