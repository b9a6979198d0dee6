"""Tolerances for comparisons against the float64 reference (``helpers.assert_close``).

A result that is a sum (every output and gradient here is) can only be as exact as the
magnitudes of the terms it adds up, not of the sum itself: a one-row gradient that is a
sum of cancelling terms is small while its rounding errors are not. So a kernel test
passes ``terms``, the elementwise sum of the terms' magnitudes, and is allowed
``|got - ref| <= rtol * terms`` with ``rtol`` a small multiple of the dtype's unit
roundoff. ``terms`` comes from ``term_magnitudes``: the same reference evaluated on the
absolute values of its inputs (and of the output gradient), which for sums of products
with positive scales is exactly that sum of magnitudes.

Where does the error come from? A kernel rounds each product's inputs at most a couple of
times (16-bit intermediates such as T or dS cast for a tensor-core dot, the 16-bit output)
and accumulates in fp32. So the error is a few units of roundoff of ``terms`` for 16-bit
dtypes; for fp32 the accumulation over K (up to ~14k on the GPU tests) adds up to about
sqrt(K) units, and fp32 dots at torch's default "highest" precision run as three TF32
products ("tf32x3", each ~2^-21 relative) on a GPU.
"""
import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Units of roundoff of the term magnitudes allowed, per dtype of the computation.
# 16-bit: at most ~1 unit from the roundings above (measured over seeds 0-24 of the
# lora/dora tests in the interpreter: <= 1.04 units for fp16; PyTorch's own fp16 math
# <= 1.98). fp32: the interpreter measures <= 2.7 units, but a GPU's fp32 dots are tf32x3
# products (~12 units each) summed over up to K / BLOCK_K ~ 220 fp32 partial sums.
TERM_UNITS = {torch.float32: 128, torch.float16: 4, torch.bfloat16: 4}
# without term magnitudes: |got - ref| <= atol * max|ref| + rtol * |ref|
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=2e-2),
}

def term_magnitudes(fn, args, dy=None):
    """``fn(*args)`` and the gradients of ``(dy * fn(*args)).sum()`` for the arguments that
    require grad (zeros where none reaches them), all evaluated in float64 on ``|args|`` and
    ``|dy|``: for each element, the sum of the magnitudes of the terms that make it up.
    None args stay None; non-tensor args pass through."""
    def absolute(a):
        if not isinstance(a, torch.Tensor):
            return a
        return a.detach().double().abs().requires_grad_(a.requires_grad)

    abs_args = [absolute(a) for a in args]
    y = fn(*abs_args)
    if dy is not None:
        y.backward(dy.detach().double().abs())
    grads = [(a.grad if a.grad is not None else torch.zeros_like(a))
             if isinstance(a, torch.Tensor) and a.requires_grad else None for a in abs_args]
    return y.detach(), grads
