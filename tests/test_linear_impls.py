"""Every implementation of the linear stage (fused, cuBLAS + in-place kernel, TMA) against
the reference, in the four forms the ops use: LoRA forward, DoRA forward, dx with the
dropout keep-mask, DoRA dx. On CPU the kernels run in the interpreter and cuBLAS is torch."""
import pytest
import torch

from data import generator, randn
from fastlora import reference
from fastlora.kernels import (cublas_linear, cublas_unsupported, dropout_mask, fused_linear,
                              term, tma_linear, tma_unsupported)
from helpers import assert_close

IMPLS = {"fused": fused_linear, "cublas": cublas_linear, "tma": tma_linear}
SHAPES = [  # (M, K, N, r); the TMA kernel needs 16-byte rows (K, N multiples of 8 in fp16)
    (37, 72, 40, 8),
    (1, 48, 104, 1),
    (300, 136, 72, 100),
    (37, 70, 48, 16),  # TMA unsupported: fused and cuBLAS only
]
FORMS = ["forward", "forward_bias", "dora_forward", "dx_dropout", "dora_dx"]


def _layer(m, k, n, r, dtype, device, seed=0):
    g = generator(seed)
    return dict(x=randn(m, k, g=g, device=device, dtype=dtype),
                weight=randn(n, k, g=g, device=device, dtype=dtype, scale=k ** -0.5),
                bias=randn(n, g=g, device=device, dtype=dtype),
                lora_A=randn(r, k, g=g, device=device, dtype=dtype, scale=k ** -0.5),
                lora_B=randn(n, r, g=g, device=device, dtype=dtype, scale=r ** -0.5),
                magnitude=randn(n, g=g, device=device).abs() + 0.5,
                dy=randn(m, n, g=g, device=device, dtype=dtype))


def _f64(t):
    return t.detach().double()


def stage_and_reference(form, layer, scaling=0.5, p=0.25, seed=7):
    """(the stage's arguments as the ops pass them, the reference's result)."""
    x, w, bias, A, B = (layer[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    dora = form.startswith("dora")
    norm = reference.dora_weight_norm(_f64(w), _f64(A), _f64(B), scaling)
    g = (_f64(layer["magnitude"]) / norm).float()
    if form.endswith("forward") or form == "forward_bias":
        b = bias if form != "forward" else None
        t = (_f64(x) @ _f64(A).t()).float()
        if dora:
            ref = reference.dora_linear(_f64(x), _f64(w), _f64(b), _f64(A), _f64(B), scaling,
                                        _f64(layer["magnitude"]))
        else:
            ref = reference.lora_linear(_f64(x), _f64(w), _f64(b) if b is not None else None,
                                        _f64(A), _f64(B), scaling)
        return (x, w.t(), term(t, B.t(), scaling), b), dict(g_out=g if dora else None), ref
    # dx: autograd of the reference gives dY W + keep * (dS A) / (1 - p), dS = s dY' B
    dy = layer["dy"]
    x64 = _f64(x).requires_grad_()
    if dora:
        y = reference.dora_linear(x64, _f64(w), None, _f64(A), _f64(B), scaling,
                                  _f64(layer["magnitude"]))
        ds = (scaling * (_f64(dy) * g.double()) @ _f64(B)).float()
        low = term(ds, A, 1.0)
    else:
        seed = torch.full((1,), seed, dtype=torch.int64, device=x.device)
        mask = dropout_mask(seed, *x.shape, p)
        y = reference.lora_linear(x64, _f64(w), None, _f64(A), _f64(B), scaling, dropout_p=p,
                                  training=True, dropout_mask=mask)
        ds = (scaling * _f64(dy) @ _f64(B)).float()
        low = term(ds, A, 1.0 / (1.0 - p), p, seed)
    y.backward(_f64(dy))
    return (dy, w, low, None), dict(g_in=g if dora else None, out_dtype=x.dtype), x64.grad


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_impl_matches_reference(impl, form, shape, dtype, device):
    layer = _layer(*shape, dtype, device)
    args, kwargs, ref = stage_and_reference(form, layer)
    a, b = args[0], args[1]
    if impl == "cublas" and kwargs.get("g_in") is not None:
        assert "M x N copy of dY" in cublas_unsupported(a, None, kwargs["g_in"])
        with pytest.raises(ValueError, match="cublas_linear: g_in"):
            cublas_linear(*args, **kwargs)
        return
    if impl == "tma" and tma_unsupported(a, b) is not None:
        assert shape[1] % 8 or shape[2] % 8, tma_unsupported(a, b)
        assert "16-byte" in tma_unsupported(a, b)
        with pytest.raises(ValueError, match="tma_linear: .*16-byte"):
            tma_linear(*args, **kwargs)
        return
    out = IMPLS[impl](*args, **kwargs)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, dtype, f"{impl} {form}")


def test_cublas_writes_into_the_torch_product(monkeypatch, device):
    """The low-rank term is added to torch.mm's output tensor itself (no second M x N buffer)."""
    layer = _layer(37, 72, 40, 8, torch.float32, device)
    args, kwargs, ref = stage_and_reference("forward_bias", layer)
    products = []
    real_mm = torch.mm

    def mm(a, b):
        products.append(real_mm(a, b))
        return products[-1]

    monkeypatch.setattr(torch, "mm", mm)
    out = cublas_linear(*args, **kwargs)
    assert len(products) == 1 and out.data_ptr() == products[0].data_ptr()
    assert_close(out, ref, torch.float32, "in place")


def test_cublas_without_low_rank_is_the_product(device):
    layer = _layer(5, 48, 40, 4, torch.float32, device)
    out = cublas_linear(layer["x"], layer["weight"].t())
    assert_close(out, _f64(layer["x"]) @ _f64(layer["weight"]).t(), torch.float32, "plain")


def test_tma_refuses_what_it_cannot_describe(monkeypatch, device):
    layer = _layer(8, 64, 32, 4, torch.float16, device)
    x, w = layer["x"], layer["weight"]
    assert tma_unsupported(x, w.t()) is None
    assert "not contiguous" in tma_unsupported(x.t().contiguous().t(), w.t())
    assert "share a dtype" in tma_unsupported(x, w.t(), torch.float32)
    assert "16-byte" in tma_unsupported(x[:, 1:], w[:, 1:].t())
    from fastlora.kernels import linear_tma

    monkeypatch.setattr(linear_tma, "TensorDescriptor", None)
    assert "tensor_descriptor" in tma_unsupported(x, w.t())


def test_tma_needs_sm90_or_the_interpreter(monkeypatch):
    from fastlora.kernels import linear_tma

    monkeypatch.setattr(linear_tma, "interpreting", lambda: False)
    x = torch.zeros(8, 64, dtype=torch.float16)
    assert "CUDA tensor" in tma_unsupported(x, x.t())


@pytest.mark.gpu
@pytest.mark.gpu_smoke
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("form", FORMS)
def test_gpu_bf16_llm_sizes(impl, form):
    layer = _layer(1000, 4096, 1536, 16, torch.bfloat16, "cuda")
    args, kwargs, ref = stage_and_reference(form, layer)
    reason = (cublas_unsupported(args[0], kwargs.get("out_dtype"), kwargs.get("g_in"))
              if impl == "cublas" else tma_unsupported(args[0], args[1]) if impl == "tma" else None)
    if reason:
        pytest.skip(reason)
    assert_close(IMPLS[impl](*args, **kwargs), ref, torch.bfloat16, f"{impl} {form}")
