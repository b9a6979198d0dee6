"""fastlora.multi_lora_linear (per-row adapters; Triton kernels in the interpreter on CPU)
against the single-adapter ops and the pure-PyTorch multi-adapter reference."""
from dataclasses import replace

import pytest
import torch

import fastlora
from fastlora import multi, reference
from fastlora.kernels import dropout_mask
from fastlora.kernels.multi_meta import group_rows
from fastlora.multi import PackedAdapters, multi_lora_linear, pack_adapters
from tolerances import assert_close

K, N = 70, 48


def make_bank(ranks, dora, dtype=torch.float32, k=K, n=N, seed=0, device="cpu", dropout=None):
    """(x-independent) weight, bias and a bank of signed random adapters, leaves with grads."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, dtype)
    bias = torch.randn(n, generator=g).to(device, dtype)
    adapters = []
    for i, (r, d) in enumerate(zip(ranks, dora)):
        A = (torch.randn(r, k, generator=g) * k ** -0.5).to(device, dtype)
        B = (torch.randn(n, r, generator=g) * r ** -0.5).to(device, dtype)
        s = 0.5 + 0.25 * i
        m = None
        if d:
            norm = reference.dora_weight_norm(weight.double(), A.double(), B.double(), s)
            m = (norm * (1 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64))).to(dtype)
        adapters.append((A, B, s, m))
    bank = pack_adapters(adapters, weight=weight, dropout=dropout)
    leaf = lambda t: t.detach().clone().requires_grad_() if t is not None else None  # noqa: E731
    return weight, bias, replace(bank, A=leaf(bank.A), B=leaf(bank.B), magnitude=leaf(bank.magnitude))


def as64(bank: PackedAdapters) -> PackedAdapters:
    leaf = lambda t: t.detach().double().requires_grad_() if t is not None else None  # noqa: E731
    return replace(bank, A=leaf(bank.A), B=leaf(bank.B), magnitude=leaf(bank.magnitude))


def adapter(bank, a):
    """Adapter a's (lora_A, lora_B, scale, magnitude or None), detached."""
    off, r = bank.offsets[a].item(), bank.ranks[a].item()
    m = bank.magnitude[a].detach() if bank.is_dora is not None and bank.is_dora[a] else None
    return bank.A[off:off + r].detach(), bank.B[off:off + r].t().detach(), bank.scales[a].item(), m


def check(x, weight, bias, bank, index, dtype, grads=True, mask=None, **kw):
    """Output (and gradients) against the float64 reference on the same values (and the
    same dropout ``mask``)."""
    y = multi_lora_linear(x, weight, bias, bank, index, **kw)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    ref_kw = dict(training=kw.get("training", False), dropout_mask=mask)
    bank64 = as64(bank)
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    y_ref = reference.multi_lora_linear(x64, weight.double(), bias.double(), bank64, index,
                                              **ref_kw)
    assert_close(y, y_ref, dtype, "output")
    if grads:
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy.double())
        if x.requires_grad:
            assert_close(x.grad, x64.grad, dtype, "grad x")
        for name in ("A", "B", "magnitude"):
            got, want = getattr(bank, name), getattr(bank64, name)
            if got is not None:
                want_grad = want.grad if want.grad is not None else torch.zeros_like(want)
                assert_close(got.grad, want_grad, dtype, f"grad {name}")
    return y


RANKS = [1, 8, 64, 3, 16]
DORA = [False, True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_equal_their_single_adapter_result(dtype, device):
    """Mixed ranks, DoRA and LoRA, base rows, an absent adapter, an unsorted assignment:
    every row equals fastlora.lora_linear / dora_linear with its own adapter."""
    weight, bias, bank = make_bank(RANKS, DORA, dtype, device=device)
    g = torch.Generator().manual_seed(1)
    index = torch.tensor([-1, 0, 1, 2, 3], device=device)[torch.randint(0, 5, (90,), generator=g)]
    x = torch.randn(90, K, generator=g).to(device, dtype).requires_grad_()
    y = check(x, weight, bias, bank, index, dtype)
    with torch.no_grad():
        for a in [-1, 0, 1, 2, 3]:
            rows = index == a
            if a == -1:
                want = torch.nn.functional.linear(x[rows], weight, bias)
            else:
                A, B, s, m = adapter(bank, a)
                want = (fastlora.dora_linear(x[rows], weight, bias, A, B, s, m) if m is not None
                        else fastlora.lora_linear(x[rows], weight, bias, A, B, s))
            assert_close(y[rows], want.double(), dtype, f"adapter {a}")
    off, r = bank.offsets[4].item(), bank.ranks[4].item()  # adapter 4 is absent
    assert bank.A.grad[off:off + r].abs().max() == 0 and bank.B.grad[off:off + r].abs().max() == 0


def _assignment(kind, m, n, g):
    if kind == "one adapter":
        return torch.full((m,), 2)
    if kind == "all base":
        return torch.full((m,), -1)
    if kind == "skewed":
        return torch.where(torch.rand(m, generator=g) < 0.9, 1, torch.randint(-1, n, (m,), generator=g))
    if kind == "sorted blocks":
        return torch.sort(torch.randint(-1, n, (m,), generator=g)).values
    return torch.randperm(m, generator=g) % n  # distinct per row when m <= n


@pytest.mark.parametrize("kind", ["one adapter", "all base", "skewed", "sorted blocks",
                                  "distinct per row"])
def test_assignments(kind, device):
    n = 40 if kind == "distinct per row" else 5
    ranks = [(1, 8, 64, 3, 16)[i % 5] for i in range(n)]
    weight, bias, bank = make_bank(ranks, [i % 3 == 1 for i in range(n)], device=device)
    g = torch.Generator().manual_seed(2)
    m = 40 if kind == "distinct per row" else 77
    index = _assignment(kind, m, n, g).to(device)
    x = torch.randn(m, K, generator=g).to(device).requires_grad_()
    check(x, weight, bias, bank, index, torch.float32, grads=kind != "distinct per row")


def test_decode_few_rows_many_adapters(device):
    """M < n: the static grid min(cdiv(M, BLOCK_M) + n, M) must still reach every row."""
    weight, bias, bank = make_bank([(1, 8, 16)[i % 3] for i in range(40)],
                                   [i % 5 == 0 for i in range(40)], device=device)
    x = torch.randn(3, K, device=device).requires_grad_()
    check(x, weight, bias, bank, torch.tensor([39, 7, -1], device=device), torch.float32)


@pytest.mark.parametrize("m", [9, 40], ids=["gather", "segments"])
def test_rank_padding_is_never_read(m, monkeypatch, device):
    """Columns of the [M, max_rank] buffers past an adapter's rank are never written: fill
    every fresh buffer with NaN, and the results must not see it."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    weight, bias, bank = make_bank([1, 16, 4], [False, True, False], device=device)
    x = torch.randn(m, K, device=device).requires_grad_()
    index = torch.arange(m, device=device) % 4 - 1
    monkeypatch.setattr(torch, "empty", poisoned)
    check(x, weight, bias, bank, index, torch.float32)


def test_3d_input_and_index(device):
    weight, bias, bank = make_bank(RANKS, DORA, device=device)
    x = torch.randn(3, 13, K, device=device).requires_grad_()
    index = torch.randint(-1, 5, (3, 13), device=device)
    check(x, weight, bias, bank, index, torch.float32)
    # a flattened index works the same
    y = multi_lora_linear(x, weight, bias, bank, index.reshape(-1))
    assert torch.equal(y, multi_lora_linear(x, weight, bias, bank, index))


def test_fp32_adapters_over_fp16_base(device):
    weight, bias, bank = make_bank([4, 16], [False, True], device=device)
    x = torch.randn(37, K, device=device, dtype=torch.float16)
    index = torch.randint(-1, 2, (37,), device=device)
    check(x, weight.half(), bias.half(), bank, index, torch.float16, grads=False)


def test_trainable_base_and_expanded_gradient(device):
    """The base weight/bias gradients (DoRA rows scale W's), and y.sum()'s stride-0 dy."""
    weight, bias, bank = make_bank(RANKS, DORA, device=device)
    weight.requires_grad_()
    bias.requires_grad_()
    x = torch.randn(50, K, device=device).requires_grad_()
    index = torch.randint(-1, 5, (50,), device=device)
    multi_lora_linear(x, weight, bias, bank, index).sum().backward()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    x64, bank64 = x.detach().double().requires_grad_(), as64(bank)
    reference.multi_lora_linear(x64, w64, b64, bank64, index).sum().backward()
    for got, want, what in [(x.grad, x64.grad, "x"), (weight.grad, w64.grad, "weight"),
                            (bias.grad, b64.grad, "bias"), (bank.A.grad, bank64.A.grad, "A")]:
        assert_close(got, want, torch.float32, f"grad {what}")


def test_dropout_matches_reference_with_same_masks(device):
    p = (0.3, 0.0, 0.5)
    weight, bias, bank = make_bank([8, 1, 16], [False] * 3, device=device, dropout=p)
    index = torch.randint(-1, 3, (60,), device=device)
    x = torch.randn(60, K, device=device).requires_grad_()
    mask = torch.ones(60, K, dtype=torch.bool, device=device)
    for a, pa in enumerate(p):
        mask[index == a] = dropout_mask(77, 60, K, pa, device=device)[index == a]
    y = check(x, weight, bias, bank, index, torch.float32, training=True, seed=77, mask=mask)
    y_eval = multi_lora_linear(x, weight, bias, bank, index)
    assert not torch.allclose(y, y_eval)  # dropout did something
    assert torch.equal(y_eval, multi_lora_linear(x, weight, bias, bank, index, seed=3))


def test_dora_with_dropout_in_training_runs_reference(monkeypatch, device):
    monkeypatch.setattr(multi, "_warned_dora_dropout", False)
    weight, bias, bank = make_bank([8, 4], [True, False], device=device, dropout=(0.2, 0.2))
    x = torch.randn(20, K, device=device)
    index = torch.randint(-1, 2, (20,), device=device)
    with pytest.warns(UserWarning, match="not fused"):
        y = multi_lora_linear(x, weight, bias, bank, index, training=True,
                              generator=torch.Generator().manual_seed(5))
    ref = reference.multi_lora_linear(x, weight, bias, bank, index, training=True,
                                            generator=torch.Generator().manual_seed(5))
    assert torch.equal(y, ref)


def test_empty_slots_and_empty_batch(device):
    """A rank-0 adapter (e.g. one that does not cover this layer) is the base; M = 0 works."""
    weight, bias, bank = make_bank([8, 4], [False, False], device=device)
    bank = replace(bank, ranks=torch.tensor([8, 0], dtype=torch.int32, device=device))
    x = torch.randn(9, K, device=device)
    y = multi_lora_linear(x, weight, bias, bank, torch.ones(9, dtype=torch.int64, device=device))
    assert_close(y, torch.nn.functional.linear(x, weight, bias).double(), torch.float32, "rank 0")
    empty = multi_lora_linear(x[:0], weight, bias, bank, torch.zeros(0, dtype=torch.int32, device=device))
    assert empty.shape == (0, N)


def test_torch_compile_fullgraph(device):
    weight, bias, bank = make_bank(RANKS, DORA, device=device)
    x = torch.randn(30, K, device=device).requires_grad_()
    index = torch.randint(-1, 5, (30,), device=device)
    fn = lambda x: multi_lora_linear(x, weight, bias, bank, index)  # noqa: E731
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (x, bank.A, bank.B, bank.magnitude)]
    for t in (x, bank.A, bank.B, bank.magnitude):
        t.grad = None
    y_eager = fn(x)
    y_eager.square().sum().backward()
    assert torch.allclose(y, y_eager, atol=1e-6)
    for g, t in zip(got, (x, bank.A, bank.B, bank.magnitude)):
        assert torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6)


def test_group_rows_is_a_stable_sort_with_segments():
    index = torch.tensor([2, -1, 0, 2, 1, -1, 0, 2])
    groups = group_rows(index, 4)
    assert groups.perm.tolist() == [2, 6, 4, 0, 3, 7, 1, 5]
    assert groups.keys.tolist() == [0, 0, 1, 2, 2, 2, 4, 4]
    assert groups.seg.tolist() == [0, 2, 3, 6, 6, 8]


def test_bad_index_raises(device):
    weight, bias, bank = make_bank([8, 4], [False, False], device=device)
    x = torch.randn(10, K, device=device)
    ok = torch.zeros(10, dtype=torch.int32, device=device)
    for bad in (2, -2):
        with pytest.raises(ValueError, match="outside -1 .. 1"):
            multi_lora_linear(x, weight, bias, bank, ok.clone().index_fill_(0, torch.tensor([3]), bad))
    with pytest.raises(ValueError, match="11 entries for 10 rows"):
        multi_lora_linear(x, weight, bias, bank, torch.zeros(11, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="integer tensor"):
        multi_lora_linear(x, weight, bias, bank, ok.float())
    with pytest.raises(TypeError, match="integer tensor"):
        multi_lora_linear(x, weight, bias, bank, ok.bool())
    with pytest.raises(TypeError, match="integer tensor"):
        multi_lora_linear(x, weight, bias, bank, [0] * 10)


def test_bad_bank_raises(device):
    weight, bias, bank = make_bank([8, 4], [True, False], device=device)
    x = torch.randn(10, K, device=device)
    index = torch.zeros(10, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="does not fit the base layer"):
        multi_lora_linear(x[:, :-1], weight[:, :-1], bias, bank, index)
    with pytest.raises(TypeError, match="share a dtype"):
        multi_lora_linear(x, weight, bias, replace(bank, B=bank.B.detach().half()), index)
    with pytest.raises(ValueError, match="bank tensors are on"):
        multi_lora_linear(x, weight, bias, replace(bank, A=bank.A.detach().to("meta"),
                                                   B=bank.B.detach().to("meta")), index)
    with pytest.raises(ValueError, match="same S"):
        replace(bank, B=bank.B[:-1])
    with pytest.raises(ValueError, match="offsets must be int32"):
        replace(bank, offsets=bank.offsets.long())
    with pytest.raises(ValueError, match="exceed A's"):
        replace(bank, offsets=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside 0..max_rank"):
        replace(bank, max_rank=4)
    with pytest.raises(ValueError, match="go together"):
        replace(bank, magnitude=None)
    with pytest.raises(ValueError, match="dropout"):
        replace(bank, dropout=(0.1,))
