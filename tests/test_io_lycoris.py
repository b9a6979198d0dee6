"""LyCORIS files built to LyCORIS' key conventions, with known weight changes: LoCon (plain and
Tucker) loads as LoRA; LoHa and LoKr deltas match formulas computed here in float64 and PEFT's
own LoHa/LoKr layers; ``to_lora`` / ``convert --rank`` turn them into LoRA by SVD."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastlora.io import (
    AdapterFormatError,
    AdapterShapeError,
    AdapterSizeError,
    LohaLayer,
    LokrLayer,
    NonFiniteWeightError,
    load_adapter,
    resize,
    save_adapter,
    to_lora,
)
from fastlora.io.cli import main


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def d(t):
    return t.double()


# ---------------------------------------------------------------- LoCon


def test_locon_conv_loads_as_lora():
    down, up = randn(3, 4, 3, 3, seed=1), randn(6, 3, 1, 1, seed=2)
    tensors = {"lora_unet_conv.lora_down.weight": down, "lora_unet_conv.lora_up.weight": up,
               "lora_unet_conv.alpha": torch.tensor(1.5)}
    adapter = load_adapter(tensors)
    layer = adapter.layers["lora_unet_conv"]
    assert (adapter.source_format, layer.kind, layer.rank, layer.is_conv, layer.scale) == ("kohya", "lora", 3, True, 0.5)
    x = randn(2, 4, 7, 7, seed=3)
    expected = 0.5 * F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, layer.delta(), padding=1), expected, rtol=1e-5, atol=1e-5)


def test_locon_tucker_core_folds_exactly():
    """LyCORIS LoCon with use_tucker: 1x1 down, k x k core, 1x1 up convolutions in a row."""
    down, mid, up = randn(3, 4, 1, 1, seed=1), randn(3, 3, 3, 3, seed=2), randn(6, 3, 1, 1, seed=3)
    tensors = {"lora_unet_c.lora_down.weight": down, "lora_unet_c.lora_mid.weight": mid,
               "lora_unet_c.lora_up.weight": up, "lora_unet_c.alpha": torch.tensor(6.0)}
    adapter = load_adapter(tensors)
    layer = adapter.layers["lora_unet_c"]
    assert adapter.source_format == "kohya" and layer.A.shape == (3, 4, 3, 3) and layer.scale == 2.0
    x = randn(2, 4, 7, 7, seed=4)
    expected = 2.0 * F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, layer.delta(), padding=1), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- LoHa


def loha_linear(seed=0, alpha=3.0):
    f = {"hada_w1_a": randn(10, 4, seed=seed), "hada_w1_b": randn(4, 12, seed=seed + 1),
         "hada_w2_a": randn(10, 4, seed=seed + 2), "hada_w2_b": randn(4, 12, seed=seed + 3)}
    expected = alpha / 4 * (d(f["hada_w1_a"]) @ d(f["hada_w1_b"])) * (d(f["hada_w2_a"]) @ d(f["hada_w2_b"]))
    return f, expected


def keyed(module, factors, alpha=None):
    out = {f"{module}.{role}": t for role, t in factors.items()}
    return out | ({} if alpha is None else {f"{module}.alpha": torch.tensor(alpha)})


def test_loha_linear_delta(tmp_path):
    factors, expected = loha_linear()
    save_file(keyed("lora_te_text_model_encoder_layers_0_mlp_fc1", factors, 3.0), str(tmp_path / "h.safetensors"))
    adapter = load_adapter(tmp_path / "h.safetensors")
    layer = adapter.layers["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert adapter.source_format == "lycoris" and isinstance(layer, LohaLayer)
    assert (layer.kind, layer.rank, layer.alpha, layer.scale, layer.out_features, layer.in_shape) == \
        ("loha", 4, 3.0, 0.75, 10, (12,))
    torch.testing.assert_close(d(layer.delta()), expected, rtol=1e-5, atol=1e-6)
    assert load_adapter(keyed("m", factors)).layers["m"].scale == 1.0  # no alpha: alpha = r
    with pytest.raises(AttributeError, match="no LoRA factors"):
        layer.A  # noqa: B018


def test_loha_tucker_conv_delta():
    r, n, c, k = 3, 6, 4, 3
    f = {"hada_t1": randn(r, r, k, k, seed=1), "hada_w1_a": randn(r, n, seed=2), "hada_w1_b": randn(r, c, seed=3),
         "hada_t2": randn(r, r, k, k, seed=4), "hada_w2_a": randn(r, n, seed=5), "hada_w2_b": randn(r, c, seed=6)}
    halves = []
    for i in (1, 2):  # rebuild[p, q] = sum_ij t[i, j] w_a[i, p] w_b[j, q]
        t, a, b = d(f[f"hada_t{i}"]), d(f[f"hada_w{i}_a"]), d(f[f"hada_w{i}_b"])
        halves.append(sum(t[i_, j_][None, None] * torch.outer(a[i_], b[j_])[:, :, None, None]
                          for i_ in range(r) for j_ in range(r)))
    layer = load_adapter(keyed("c", f, 1.5)).layers["c"]
    assert layer.in_shape == (c, k, k) and layer.is_conv
    torch.testing.assert_close(d(layer.delta()), 0.5 * halves[0] * halves[1], rtol=1e-5, atol=1e-6)


def test_loha_flattened_conv_kernel_restored_by_the_base_model():
    f = {"hada_w1_a": randn(6, 2, seed=1), "hada_w1_b": randn(2, 4 * 9, seed=2),
         "hada_w2_a": randn(6, 2, seed=3), "hada_w2_b": randn(2, 4 * 9, seed=4)}
    alone = load_adapter(keyed("lora_unet_conv", f)).layers["lora_unet_conv"]
    assert alone.in_shape == (36,) and not alone.is_conv
    model = nn.Module()
    model.conv = nn.Conv2d(4, 6, 3)
    bound = load_adapter(keyed("lora_unet_conv", f), base_model=model).layers["conv"]
    assert bound.in_shape == (4, 3, 3) and bound.is_conv
    torch.testing.assert_close(bound.delta(), alone.delta().reshape(6, 4, 3, 3))
    model.conv = nn.Conv2d(4, 6, 2)
    with pytest.raises(AdapterShapeError, match="does not fit 'conv'"):
        load_adapter(keyed("lora_unet_conv", f), base_model=model)


# ---------------------------------------------------------------- LoKr


def blocks(w1, w2):
    """kron(w1, w2) built block by block: block (i, j) is w1[i, j] * w2."""
    a, c = w1.shape
    b, dd = w2.shape[:2]
    out = torch.zeros(a * b, c * dd, *w2.shape[2:], dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * dd:(j + 1) * dd] = w1[i, j] * d(w2)
    return out


def test_lokr_decomposed_w2():
    f = {"lokr_w1": randn(2, 3, seed=1), "lokr_w2_a": randn(5, 2, seed=2), "lokr_w2_b": randn(2, 4, seed=3)}
    layer = load_adapter(keyed("lora_unet_x", f, 1.0)).layers["lora_unet_x"]
    assert isinstance(layer, LokrLayer) and (layer.rank, layer.scale, layer.out_features, layer.in_shape) == \
        (2, 0.5, 10, (12,))
    torch.testing.assert_close(d(layer.delta()), 0.5 * blocks(d(f["lokr_w1"]), d(f["lokr_w2_a"]) @ d(f["lokr_w2_b"])))


def test_lokr_decomposed_w1_full_conv_w2():
    f = {"lokr_w1_a": randn(2, 1, seed=1), "lokr_w1_b": randn(1, 3, seed=2), "lokr_w2": randn(4, 5, 3, 3, seed=3)}
    layer = load_adapter(keyed("m", f, 3.0)).layers["m"]
    assert (layer.rank, layer.scale, layer.shape) == (1, 3.0, (8, 15, 3, 3))
    torch.testing.assert_close(d(layer.delta()), 3.0 * blocks(d(f["lokr_w1_a"]) @ d(f["lokr_w1_b"]), f["lokr_w2"]))


def test_lokr_full_matrices_ignore_alpha():
    """LyCORIS applies no scale when both Kronecker factors are full matrices."""
    f = {"lokr_w1": randn(2, 3, seed=1), "lokr_w2": randn(4, 5, seed=2)}
    layer = load_adapter(keyed("m", f, 7.0)).layers["m"]
    assert layer.rank is None and layer.scale == 1.0
    torch.testing.assert_close(d(layer.delta()), blocks(d(f["lokr_w1"]), f["lokr_w2"]))


def test_lokr_tucker_w2():
    r = 2
    f = {"lokr_w1": randn(2, 2, seed=1), "lokr_t2": randn(r, r, 3, 3, seed=2), "lokr_w2_a": randn(r, 3, seed=3),
         "lokr_w2_b": randn(r, 4, seed=4)}
    t, a, b = d(f["lokr_t2"]), d(f["lokr_w2_a"]), d(f["lokr_w2_b"])
    w2 = sum(t[i, j][None, None] * torch.outer(a[i], b[j])[:, :, None, None] for i in range(r) for j in range(r))
    layer = load_adapter(keyed("m", f, 4.0)).layers["m"]
    assert layer.shape == (6, 8, 3, 3)
    torch.testing.assert_close(d(layer.delta()), 2.0 * blocks(d(f["lokr_w1"]), w2), rtol=1e-5, atol=1e-6)


def test_bad_lycoris_shapes():
    f, _ = loha_linear()
    with pytest.raises(AdapterShapeError, match="m.hada_w2_b"):
        load_adapter(keyed("m", f | {"hada_w2_b": randn(4, 11, seed=9)}))
    with pytest.raises(AdapterShapeError, match="one dim r"):
        load_adapter(keyed("m", {"lokr_w1_a": randn(2, 1, seed=1), "lokr_w1_b": randn(1, 3, seed=2),
                                 "lokr_w2_a": randn(4, 2, seed=3), "lokr_w2_b": randn(2, 5, seed=4)}))
    with pytest.raises(AdapterShapeError, match="not both"):
        load_adapter(keyed("m", {"lokr_w1": randn(2, 3, seed=1), "lokr_w1_a": randn(2, 1, seed=1),
                                 "lokr_w2": randn(4, 5, seed=2)}))


# ---------------------------------------------------------------- against PEFT's LoHa / LoKr


def peft_delta_and_file(config, model):
    """PEFT's delta for ``fc`` and its factors under LyCORIS keys (``lora_fc.<role>`` + alpha)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(model, config)
    layer = wrapped.base_model.model.fc
    tensors = {f"lora_fc.{role}": getattr(layer, role)["default"].detach().clone()
               for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                            "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
               if hasattr(layer, role) and "default" in getattr(layer, role)}
    tensors["lora_fc.alpha"] = torch.tensor(float(config.alpha))
    with torch.no_grad():
        return layer.get_delta_weight("default"), tensors


@pytest.mark.parametrize("kind", ["loha", "loha-conv-tucker", "lokr"])
def test_deltas_match_peft(kind):
    peft = pytest.importorskip("peft")
    model = nn.Module()
    if kind == "loha":
        model.fc = nn.Linear(12, 10)
        config = peft.LoHaConfig(r=4, alpha=6, target_modules=["fc"], init_weights=False)
    elif kind == "loha-conv-tucker":
        model.fc = nn.Conv2d(4, 6, 3)
        config = peft.LoHaConfig(r=3, alpha=2, target_modules=["fc"], init_weights=False, use_effective_conv2d=True)
    else:
        model.fc = nn.Linear(64, 64)
        config = peft.LoKrConfig(r=2, alpha=5, target_modules=["fc"], init_weights=False, decompose_both=True)
    expected, tensors = peft_delta_and_file(config, model)
    layer = load_adapter(tensors).layers["lora_fc"]
    assert layer.kind == kind[:4]
    torch.testing.assert_close(layer.delta(), expected.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- into LoRA


def test_to_lora_keeps_lora_layers_and_reduces_lycoris_ones():
    factors, expected = loha_linear(alpha=2.0)
    lora = {"lora_b.lora_down.weight": randn(3, 12, seed=7), "lora_b.lora_up.weight": randn(10, 3, seed=8)}
    adapter = load_adapter(keyed("lora_a", factors, 2.0) | lora)
    singular = torch.linalg.svdvals(expected)
    exact, report = to_lora(adapter, method="sv_fro", threshold=1.0)
    assert set(report) == {"lora_a"} and exact.layers["lora_b"] is adapter.layers["lora_b"]
    assert exact.source_format == "kohya" and report["lora_a"].kind == "loha" and report["lora_a"].old_rank == 4
    layer = exact.layers["lora_a"]
    assert layer.kind == "lora" and layer.rank == 10 and layer.scale == 1.0
    torch.testing.assert_close(d(layer.delta()), expected, rtol=1e-4, atol=1e-5)
    small, report = to_lora(adapter, rank=3)
    error = torch.linalg.matrix_norm(d(small.layers["lora_a"].delta()) - expected)
    assert float(error) == pytest.approx(float(singular[3:].square().sum().sqrt()), rel=1e-3)
    kept = 100 * float(singular[:3].square().sum().sqrt() / singular.square().sum().sqrt())
    assert report["lora_a"].fro_retained == pytest.approx(kept, rel=1e-4)
    both, report = resize(adapter, rank=2)
    assert set(report) == {"lora_a", "lora_b"} and {layer.rank for layer in both.layers.values()} == {2}


def test_lycoris_layers_are_not_saved_as_lora(tmp_path):
    factors, _ = loha_linear()
    adapter = load_adapter(keyed("lora_a", factors))
    with pytest.raises(AdapterFormatError, match="is a loha layer.*to_lora"):
        save_adapter(adapter, tmp_path / "k.safetensors", "kohya")


def test_convert_command(tmp_path, capsys):
    loha, _ = loha_linear(alpha=2.0)
    lokr = {"lokr_w1": randn(2, 3, seed=1), "lokr_w2_a": randn(5, 2, seed=2), "lokr_w2_b": randn(2, 4, seed=3)}
    tensors = keyed("lora_unet_a_to_q", loha, 2.0) | keyed("lora_unet_a_to_k", lokr, 2.0)
    save_file(tensors, str(tmp_path / "ly.safetensors"))
    assert main(["inspect", str(tmp_path / "ly.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format:      lycoris" in out and "1 loha" in out and "1 lokr" in out
    assert main(["convert", str(tmp_path / "ly.safetensors"), str(tmp_path / "l.safetensors"), "--to", "lora"]) == 2
    assert "pass --rank R" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "ly.safetensors"), str(tmp_path / "l.safetensors"), "--to", "lora",
                 "--rank", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines() if line.startswith("lora_unet")}
    assert rows == {"lora_unet_a_to_q": ["loha", "4", "2"], "lora_unet_a_to_k": ["lokr", "2", "2"]}
    assert "least kept share" in out and "lycoris -> kohya" in out
    converted = load_adapter(tmp_path / "l.safetensors")
    assert converted.source_format == "kohya" and {layer.rank for layer in converted.layers.values()} == {2}
    original = load_adapter(tmp_path / "ly.safetensors")
    # the LoKr change [10, 12] = kron([2, 3], rank-2 [5, 4]) has rank 2 * 2 = 4 > 2: not exact
    assert main(["convert", str(tmp_path / "ly.safetensors"), str(tmp_path / "x.safetensors"), "--to", "kohya",
                 "--method", "sv_fro", "--threshold", "0.99999", "--quiet"]) == 0
    exact = load_adapter(tmp_path / "x.safetensors")
    assert exact.layers["lora_unet_a_to_k"].rank == 4
    for name, layer in exact.layers.items():
        torch.testing.assert_close(layer.delta(), original.layers[name].delta(), rtol=1e-4, atol=1e-4)
    assert json.loads(json.dumps(str(exact)))  # printable


# ---------------------------------------------------------------- into LoRA without the full change


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``delta`` (flattened to 2-D), float64."""
    u, s, vh = torch.linalg.svd(d(delta).flatten(1), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def test_lokr_of_two_full_1000x1000_factors_converts_without_the_product():
    """A 8 MB file whose change is [10^6, 10^6] (4 TB in float32): its rank-4 LoRA comes from
    the factors' SVDs, and no tensor larger than the new factors is ever built."""
    f = {"lokr_w1": randn(1000, 1000, seed=1), "lokr_w2": randn(1000, 1000, seed=2)}
    adapter = load_adapter(keyed("lycoris_fc", f))
    with LargestTensor() as largest:
        converted, report = to_lora(adapter, rank=4)
    layer = converted.layers["lycoris_fc"]
    assert (layer.rank, layer.out_features, layer.in_shape, layer.scale) == (4, 10 ** 6, (10 ** 6,), 1.0)
    assert largest.numel <= 4 * 10 ** 6
    s1, s2 = torch.linalg.svdvals(d(f["lokr_w1"])), torch.linalg.svdvals(d(f["lokr_w2"]))
    top = (s1[:, None] * s2[None, :]).flatten().sort(descending=True).values
    # B A is a sum of 4 rank-one Kronecker products: its singular values are B's and A's column
    # norms multiplied (the columns are orthogonal)
    kept = d(layer.B).norm(dim=0) * d(layer.A).norm(dim=1)
    torch.testing.assert_close(kept, top[:4], rtol=1e-4, atol=0)
    expected = 100 * float(top[:4].square().sum().sqrt() / top.square().sum().sqrt())
    assert report["lycoris_fc"].fro_retained == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", ["lokr-full", "lokr-low-rank", "lokr-tucker-conv", "loha", "loha-tucker-conv"])
def test_truncation_without_the_product_matches_the_dense_svd(kind):
    """Each factored path keeps exactly the top singular values and vectors of the change."""
    if kind == "lokr-full":
        f = {"lokr_w1": randn(6, 5, seed=1), "lokr_w2": randn(7, 4, seed=2)}
    elif kind == "lokr-low-rank":
        f = {"lokr_w1_a": randn(6, 3, seed=1), "lokr_w1_b": randn(3, 5, seed=2), "lokr_w2_a": randn(7, 3, seed=3),
             "lokr_w2_b": randn(3, 4, seed=4)}
    elif kind == "lokr-tucker-conv":
        f = {"lokr_w1": randn(2, 3, seed=1), "lokr_t2": randn(2, 2, 3, 3, seed=2), "lokr_w2_a": randn(2, 5, seed=3),
             "lokr_w2_b": randn(2, 4, seed=4)}
    elif kind == "loha":  # r1 * r2 = 9 < min(N, K'): the factored path
        f = {"hada_w1_a": randn(40, 3, seed=1), "hada_w1_b": randn(3, 30, seed=2), "hada_w2_a": randn(40, 3, seed=3),
             "hada_w2_b": randn(3, 30, seed=4)}
    else:
        f = {"hada_t1": randn(2, 2, 3, 3, seed=1), "hada_w1_a": randn(2, 8, seed=2), "hada_w1_b": randn(2, 4, seed=3),
             "hada_t2": randn(2, 2, 3, 3, seed=4), "hada_w2_a": randn(2, 8, seed=5), "hada_w2_b": randn(2, 4, seed=6)}
    layer = load_adapter(keyed("m", f, 1.5)).layers["m"]
    dense = layer.delta()
    for rank in (1, 3):
        converted, report = to_lora(load_adapter(keyed("m", f, 1.5)), rank=rank)
        got = converted.layers["m"]
        assert got.rank == rank and got.A.shape[1:] == dense.shape[1:]
        torch.testing.assert_close(d(got.delta()), truncated(dense, rank), rtol=1e-4, atol=1e-4)


def test_loha_full_change_over_the_size_limit_names_the_layer(monkeypatch, capsys, tmp_path):
    """r1 * r2 >= min(N, K'): the full change is decomposed, within the size limit."""
    factors, _ = loha_linear()  # [10, 12], r = 4: 16 >= 10
    monkeypatch.setattr("fastlora.io.lycoris.MAX_ELEMENTS", 100)
    adapter = load_adapter(keyed("lora_unet_a", factors, 2.0))
    with pytest.raises(AdapterSizeError, match=r"layer 'lora_unet_a': the full LoHa change \[10, 12\] would hold "
                                               r"120 elements .* over the limit of 100"):
        to_lora(adapter, rank=2)
    with pytest.raises(AdapterSizeError, match=r"full weight change \[10, 12\] would hold 120 elements"):
        adapter.layers["lora_unet_a"].delta()
    save_file(keyed("lora_unet_a", factors, 2.0), str(tmp_path / "h.safetensors"))
    assert main(["convert", str(tmp_path / "h.safetensors"), str(tmp_path / "l.safetensors"), "--to", "lora",
                 "--rank", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'lora_unet_a'" in err and "120 elements" in err, err


def test_lokr_rank_whose_factors_are_over_the_size_limit_names_the_layer():
    f = {"lokr_w1": randn(1000, 30, seed=1), "lokr_w2": randn(1000, 30, seed=2)}
    with pytest.raises(AdapterSizeError, match=r"layer 'm': rank-900 LoRA factors \[1000000, 900\] and \[900, 900\] "
                                               r"would hold 900,810,000 elements"):
        to_lora(load_adapter(keyed("m", f)), method="sv_fro", threshold=1.0)


@pytest.mark.parametrize("kind", ["loha-factored", "loha-full", "lokr"])
def test_change_overflowing_float32_names_the_layer(kind, capsys, tmp_path):
    """Finite factors whose product overflows float32: an error naming the layer, never a
    LinAlgError (and one line from the command line)."""
    big = torch.full((40, 3), 1e20)
    if kind == "loha-factored":
        f = {"hada_w1_a": big, "hada_w1_b": torch.full((3, 30), 1e20), "hada_w2_a": randn(40, 3, seed=1),
             "hada_w2_b": randn(3, 30, seed=2)}
    elif kind == "loha-full":
        f = {"hada_w1_a": big[:10], "hada_w1_b": torch.full((3, 12), 1e20), "hada_w2_a": randn(10, 3, seed=1),
             "hada_w2_b": randn(3, 12, seed=2)}
    else:
        f = {"lokr_w1": torch.full((4, 4), 1e30), "lokr_w2": torch.full((3, 3), 1e30)}
    tensors = keyed("lora_unet_a", f)
    with pytest.raises(NonFiniteWeightError, match="layer 'lora_unet_a': its weight change in float32"):
        to_lora(load_adapter(tensors), rank=2)
    save_file(tensors, str(tmp_path / "big.safetensors"))
    assert main(["convert", str(tmp_path / "big.safetensors"), str(tmp_path / "l.safetensors"), "--to", "lora",
                 "--rank", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'lora_unet_a'" in err and "NaN or Inf" in err, err


# ---------------------------------------------------------------- LyCORIS' own wrapper, alpha 0


def wrapped_model() -> nn.Module:
    """Modules ``down_blocks.0.conv`` (Conv2d 4 -> 6, 3x3), ``down_blocks.0.attn.to_q``
    (Linear 12 -> 10) and ``proj`` (Linear 12 -> 10)."""
    block = nn.Module()
    block.conv, block.attn = nn.Conv2d(4, 6, 3), nn.Module()
    block.attn.to_q = nn.Linear(12, 10)
    model = nn.Module()
    model.down_blocks, model.proj = nn.ModuleList([block]), nn.Linear(12, 10)
    return model


def test_lycoris_wrapper_names_bind_to_their_model():
    """LyCORIS' generic wrapper names a module ``lycoris_`` plus its underscored path."""
    loha, expected = loha_linear(alpha=3.0)
    conv = {"lokr_w1": randn(2, 2, seed=1), "lokr_w2": randn(3, 2, 3, 3, seed=2)}
    locon = {"lora_down.weight": randn(2, 12, seed=3), "lora_up.weight": randn(10, 2, seed=4)}
    tensors = keyed("lycoris_down_blocks_0_attn_to_q", loha, 3.0) | keyed("lycoris_down_blocks_0_conv", conv) \
        | keyed("lycoris_proj", locon, 1.0)
    adapter = load_adapter(tensors, base_model=wrapped_model())
    assert sorted(adapter.layers) == ["down_blocks.0.attn.to_q", "down_blocks.0.conv", "proj"]
    torch.testing.assert_close(d(adapter.layers["down_blocks.0.attn.to_q"].delta()), expected, rtol=1e-5, atol=1e-6)
    assert adapter.layers["down_blocks.0.conv"].shape == (6, 4, 3, 3)
    torch.testing.assert_close(d(adapter.layers["down_blocks.0.conv"].delta()),
                               blocks(d(conv["lokr_w1"]), conv["lokr_w2"]))
    assert adapter.layers["proj"].scale == 0.5
    with pytest.raises(AdapterFormatError, match="kohya's underscored names"):  # unbound: not a module path
        save_adapter(load_adapter(keyed("lycoris_proj", locon)), "unused", "peft")


@pytest.mark.parametrize("kind", ["loha", "lokr", "locon"])
def test_alpha_zero_means_no_scaling(kind):
    """LyCORIS and kohya read ``.alpha = 0`` as alpha = rank (scale 1), not as scale 0."""
    if kind == "loha":
        factors, _ = loha_linear()
    elif kind == "lokr":
        factors = {"lokr_w1": randn(2, 3, seed=1), "lokr_w2_a": randn(5, 2, seed=2), "lokr_w2_b": randn(2, 4, seed=3)}
    else:
        factors = {"lora_down.weight": randn(3, 12, seed=1), "lora_up.weight": randn(10, 3, seed=2)}
    layer = load_adapter(keyed("lora_unet_x", factors, 0.0)).layers["lora_unet_x"]
    assert (layer.alpha, layer.scale) == (float(layer.rank), 1.0)
    assert torch.equal(layer.delta(), load_adapter(keyed("lora_unet_x", factors)).layers["lora_unet_x"].delta())


def test_scale_zero_is_not_written_as_kohya_alpha_zero(tmp_path):
    """A kohya alpha of 0 reads as no scaling: a layer of scale 0 cannot be written."""
    from fastlora.io import Adapter, AdapterLayer

    adapter = Adapter({"proj": AdapterLayer(randn(2, 12, seed=1), randn(10, 2, seed=2), 0.0)}, "peft")
    with pytest.raises(AdapterFormatError, match="layer 'proj' has scale 0, which kohya files cannot hold"):
        save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()
