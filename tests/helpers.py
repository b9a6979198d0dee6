"""The one comparison of the tests: ``assert_close``, with the tolerances of
``tests/tolerances.py`` (against the float64 reference) or ``MODEL_TOL`` (two runs of one
model, e.g. a patched PEFT model against an unpatched copy)."""
import torch

from tolerances import TERM_UNITS, TOLERANCES, UNIT_ROUNDOFF

CUDA = torch.cuda.is_available()
# two fp32 runs of one model compared as a whole: fp32 on CPU; on a GPU the kernels' fp32
# tl.dot may use TF32
MODEL_TOL = 2e-3 if CUDA else 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error of a result as a whole."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                 what: str = "", terms: torch.Tensor | None = None, *,
                 tol: float | None = None) -> None:
    """Compare ``got`` with ``ref``.

    With ``dtype`` (``got`` computed in ``dtype``, ``ref`` a float64 reference),
    elementwise: with ``terms`` (the sum of the terms' magnitudes, from
    ``tolerances.term_magnitudes``) ``|got - ref| <= TERM_UNITS[dtype] * unit roundoff *
    terms``; without, ``TOLERANCES[dtype]`` relative to |ref| (results compared at a
    coarser level). Without ``dtype`` (two runs of one model): the result as a whole,
    ``max |got - ref| <= tol * max |ref|`` (``tol`` default ``MODEL_TOL``).
    """
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if dtype is None:
        err = rel_err(got, ref)
        tol = MODEL_TOL if tol is None else tol
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
        return
    ref = ref.detach().double()
    got = got.detach().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs()
    if terms is None:
        tols = TOLERANCES[dtype]
        bound = tols["atol"] * (ref.abs().max().item() or 1.0) + tols["rtol"] * ref.abs()
        how = f"{tols} of |ref|"
    else:
        rtol = TERM_UNITS[dtype] * UNIT_ROUNDOFF[dtype]
        bound = rtol * terms.detach().double()
        how = f"{rtol:.3g} x the term magnitude"
    worst = (err - bound).argmax()
    assert err.flatten()[worst] <= bound.flatten()[worst], (
        f"{what}: error {err.flatten()[worst].item():.3g} at element {worst.item()} exceeds "
        f"{bound.flatten()[worst].item():.3g} ({how}) for {dtype}; max error {err.max().item():.3g}")
