"""fastlora.io.resize on factors with known singular values (5, 3, 2) hidden in rank 8."""
from __future__ import annotations

import math

import pytest
import torch

from fastlora.io import Adapter, AdapterLayer, load_adapter, resize, save_adapter

SINGULAR = torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)


def orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def low_rank_layer(out=40, in_shape=(30,), rank=8, alpha=16.0, singular=SINGULAR, seed=0, **extra):
    """Factors B ``[out, rank]``, A ``[rank, *in_shape]`` whose product has exactly ``singular``
    as singular values, so ``delta() = scale * U diag(singular) V^T``."""
    k = len(singular)
    u, v = orthonormal(out, k, seed), orthonormal(math.prod(in_shape), k, seed + 1)
    mix = orthonormal(rank, k, seed + 2).T  # [k, rank], orthonormal rows: mix @ mix.T = I
    b = (u * singular) @ mix
    a = (mix.T @ v.T).reshape(rank, *in_shape)
    return AdapterLayer(A=a.float(), B=b.float(), alpha=alpha, **extra)


def one_layer(layer):
    return Adapter({"layer": layer}, "peft")


@pytest.mark.parametrize("method, threshold", [("sv_ratio", 1000.0), ("sv_cumulative", 0.999), ("sv_fro", 0.9999)])
def test_dynamic_methods_recover_the_true_rank(method, threshold):
    layer = low_rank_layer()
    resized, report = resize(one_layer(layer), method=method, threshold=threshold)
    new = resized.layers["layer"]
    assert new.rank == 3 and report["layer"].new_rank == 3 and report["layer"].old_rank == 8
    assert new.scale == pytest.approx(layer.scale, rel=1e-12) and new.alpha == pytest.approx(6.0)
    torch.testing.assert_close(new.delta(), layer.delta(), atol=1e-5, rtol=1e-5)
    assert report["layer"].fro_retained == pytest.approx(100.0, abs=1e-3)


@pytest.mark.parametrize("method, threshold, kept", [
    ("sv_ratio", 1.5, 1), ("sv_ratio", 2.4, 2), ("sv_ratio", 2.6, 3),
    ("sv_cumulative", 0.49, 1), ("sv_cumulative", 0.79, 2), ("sv_cumulative", 0.81, 3),
    ("sv_fro", 0.80, 1), ("sv_fro", 0.94, 2), ("sv_fro", 0.95, 3),  # sqrt(25/38)=0.81, sqrt(34/38)=0.946
])
def test_dynamic_thresholds(method, threshold, kept):
    _, report = resize(one_layer(low_rank_layer()), method=method, threshold=threshold)
    assert report["layer"].new_rank == kept


def test_fixed_rank_is_the_best_approximation_and_reports_retention():
    layer = low_rank_layer()
    resized, report = resize(one_layer(layer), rank=2)
    new = resized.layers["layer"]
    assert (new.rank, new.alpha, new.A.shape, new.B.shape) == (2, 4.0, (2, 30), (40, 2))
    error = torch.linalg.matrix_norm(new.delta() - layer.delta())
    assert float(error) == pytest.approx(layer.scale * 2.0, rel=1e-4)  # the dropped singular value
    assert report["layer"].fro_retained == pytest.approx(100 * math.sqrt(34 / 38), rel=1e-5)
    assert report["layer"].sv_retained == pytest.approx(80.0, rel=1e-5)


def test_rank_never_grows_and_max_rank_caps():
    adapter = one_layer(low_rank_layer())
    assert resize(adapter, rank=20)[0].layers["layer"].rank == 8  # capped at the current rank
    assert resize(adapter, method="sv_ratio", threshold=1000.0, max_rank=2)[0].layers["layer"].rank == 2


def test_per_layer_dynamic_ranks_conv_dtype_dora_and_rslora():
    adapter = Adapter({
        "two": low_rank_layer(singular=torch.tensor([4.0, 4.0], dtype=torch.float64), seed=5),
        "conv": low_rank_layer(out=6, in_shape=(3, 3, 3), rank=5, seed=7, rslora=True),
        "half": low_rank_layer(rank=6, seed=9, magnitude=torch.rand(40) + 1, bias=torch.randn(40)),
    }, "peft")
    half = adapter.layers["half"]
    half.A, half.B = half.A.half(), half.B.half()
    resized, report = resize(adapter, method="sv_ratio", threshold=1000.0)
    assert {name: r.new_rank for name, r in report.items()} == {"two": 2, "conv": 3, "half": 3}
    conv, old_conv = resized.layers["conv"], adapter.layers["conv"]
    assert conv.A.shape == (3, 3, 3, 3) and conv.rslora
    assert conv.alpha == pytest.approx(old_conv.scale * math.sqrt(3))
    torch.testing.assert_close(conv.delta(), old_conv.delta(), atol=1e-5, rtol=1e-5)
    half = resized.layers["half"]
    assert half.A.dtype == half.B.dtype == torch.float16
    assert half.magnitude is adapter.layers["half"].magnitude and half.bias is adapter.layers["half"].bias
    assert adapter.layers["two"].rank == 8  # the input adapter is left alone


def test_zero_layer_keeps_rank_one():
    zero = AdapterLayer(A=torch.randn(4, 6), B=torch.zeros(5, 4), alpha=8.0)
    resized, report = resize(one_layer(zero), method="sv_fro", threshold=0.9)
    assert resized.layers["layer"].rank == 1 and report["layer"].fro_retained == 100.0
    assert not resized.layers["layer"].delta().any()


def test_resized_adapter_saves_with_its_scales(tmp_path):
    resized, _ = resize(one_layer(low_rank_layer()), method="sv_ratio", threshold=1000.0)
    save_adapter(resized, tmp_path / "k.safetensors", "kohya")
    back = load_adapter(tmp_path / "k.safetensors").layers["layer"]
    assert back.rank == 3 and back.scale == resized.layers["layer"].scale


@pytest.mark.parametrize("kwargs", [
    dict(), dict(rank=0), dict(rank=2, threshold=0.5), dict(method="svd"), dict(method="sv_fro"),
    dict(method="sv_fro", threshold=1.5), dict(method="sv_ratio", threshold=0.5),
    dict(method="sv_cumulative", threshold=0.9, rank=2), dict(method="sv_fro", threshold=0.9, max_rank=0),
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        resize(one_layer(low_rank_layer()), **kwargs)
