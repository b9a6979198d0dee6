"""fastlora.multi_lora_linear (per-row adapters; Triton kernels in the interpreter on CPU)
against the single-adapter ops and the pure-PyTorch multi-adapter reference.

Data from tests/data.py (seeded, CPU-drawn, moved to the device under test); tolerances
relative to the term magnitudes (tests/tolerances.py)."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fastlora
from common import capture
from data import generator, randint, randn
from fastlora import functional, reference
from fastlora import multi_lora_linear
from fastlora.adapters.packed import pack_adapters
from fastlora.kernels import dropout_mask
from fastlora.kernels.multi_meta import group_rows
from helpers import assert_close
from op_cases import K, N, compare, make_bank, upstream

NAMES = ["x", "weight", "bias", "A", "B", "magnitude"]


def adapter(bank, a):
    """Adapter a's (lora_A, lora_B, scale, magnitude or None), detached."""
    off, r = bank.offsets[a].item(), bank.ranks[a].item()
    m = bank.magnitude[a].detach() if bank.is_dora is not None and bank.is_dora[a] else None
    return bank.A[off:off + r].detach(), bank.B[off:off + r].t().detach(), bank.scales[a].item(), m


def reference_fn(bank, index, **kw):
    """The reference as a function of (x, weight, bias, A, B, magnitude), the bank's DoRA
    norms held fixed (they are detached)."""
    def fn(x, weight, bias, A, B, magnitude):
        return reference.multi_lora_linear(x, weight, bias, replace(bank, A=A, B=B, magnitude=magnitude),
                                           index, **kw)
    return fn


def check(x, weight, bias, bank, index, dtype, mask=None, **kw):
    """Output and gradients against the float64 reference on the same values (and the
    same dropout ``mask``); returns y and its term magnitudes."""
    y = multi_lora_linear(x, weight, bias, bank, index, **kw)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    dy = upstream(y, 0)
    y.backward(dy)
    fn = reference_fn(bank, index, training=kw.get("training", False), dropout_mask=mask)
    return y, compare(fn, [x, weight, bias, bank.A, bank.B, bank.magnitude], y, dy, dtype, NAMES)


RANKS = [1, 8, 64, 3, 16]
DORA = [False, True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_equal_their_single_adapter_result(dtype, multi_path, device):
    """Mixed ranks, DoRA and LoRA, base rows, an absent adapter, an unsorted assignment:
    every row equals fastlora.lora_linear / dora_linear with its own adapter."""
    weight, bias, bank = make_bank(RANKS, DORA, dtype, device=device)
    g = generator(1)
    index = randint(-1, 4, (90,), g=g, device=device)
    x = randn(90, K, g=g, device=device, dtype=dtype, requires_grad=True)
    y, terms = check(x, weight, bias, bank, index, dtype)
    with torch.no_grad():
        for a in [-1, 0, 1, 2, 3]:
            rows = index == a
            if a == -1:
                want = torch.nn.functional.linear(x[rows], weight, bias)
            else:
                A, B, s, m = adapter(bank, a)
                want = (fastlora.dora_linear(x[rows], weight, bias, A, B, s, m) if m is not None
                        else fastlora.lora_linear(x[rows], weight, bias, A, B, s))
            # both are within one tolerance of the reference: within two of each other
            assert_close(y[rows], want.double(), dtype, f"adapter {a}", 2 * terms[rows])
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
def test_assignments(kind, multi_path, device):
    n = 40 if kind == "distinct per row" else 5
    ranks = [(1, 8, 64, 3, 16)[i % 5] for i in range(n)]
    weight, bias, bank = make_bank(ranks, [i % 3 == 1 for i in range(n)], device=device)
    g = generator(2)
    m = 40 if kind == "distinct per row" else 77
    index = _assignment(kind, m, n, g).to(device)  # drawn on the CPU, then moved
    x = randn(m, K, g=g, device=device, requires_grad=True)
    check(x, weight, bias, bank, index, torch.float32)


def test_decode_few_rows_many_adapters(multi_path, device):
    """M < n: the static grid min(cdiv(M, BLOCK_M) + n, M) must still reach every row."""
    weight, bias, bank = make_bank([(1, 8, 16)[i % 3] for i in range(40)],
                                   [i % 5 == 0 for i in range(40)], device=device)
    x = randn(3, K, g=generator(3), device=device, requires_grad=True)
    check(x, weight, bias, bank, torch.tensor([39, 7, -1], device=device), torch.float32)


def test_rank_padding_is_never_read(multi_path, monkeypatch, device):
    """Columns of the [M, max_rank] buffers past an adapter's rank are never written: fill
    every fresh buffer with NaN, and the results must not see it."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    weight, bias, bank = make_bank([1, 16, 4], [False, True, False], device=device)
    x = randn(40, K, g=generator(4), device=device, requires_grad=True)
    index = torch.arange(40, device=device) % 4 - 1
    monkeypatch.setattr(torch, "empty", poisoned)
    check(x, weight, bias, bank, index, torch.float32)


def test_decode_forward_is_two_launches_reading_w_once(monkeypatch, device):
    """A decode batch (64 rows, 32 distinct adapters, DoRA ones among them, base rows) costs
    two launches per layer forward, whatever the adapters: the gathered shrink and the
    fused linear (every row its own adapter's B, DoRA's g made in the kernel). Nothing is
    sorted, and no torch op runs besides allocations and views."""

    from fastlora.kernels import multi_meta
    from fastlora.adapters.routing import Routing
    from spies import count_calls, count_launches, torch_ops

    weight, bias, bank = make_bank([(1, 8, 16, 3)[i % 4] for i in range(32)],
                                   [i % 3 == 0 for i in range(32)], device=device)
    g = generator(15)
    index = (torch.randperm(64, generator=g) % 33 - 1).to(device)  # all 32 adapters, base rows
    x = randn(64, K, g=g, device=device)
    routing = Routing.from_index(index, bank.n)
    routing.row_index(64)  # made once per model forward, before the layers

    grouped = count_calls(monkeypatch, (multi_meta, "group_rows"))
    launches = count_launches(monkeypatch)
    with torch.no_grad(), torch_ops() as ops:
        y = multi_lora_linear(x, weight, bias, bank, routing)
    assert launches == ["_lora_shrink_kernel", "_lora_linear_kernel"], launches
    assert grouped == {"group_rows": 0}
    assert ops.ops <= {"fastlora::multi_lora_fwd", "aten::view", "aten::view.dtype", "aten::t",
                       "aten::detach", "aten::empty.memory_format"}, ops.ops
    want = reference.multi_lora_linear(x.double(), weight.double(), bias.double(),
                                       bank.map(torch.Tensor.double), index)
    assert_close(y, want, torch.float32, "decode rows")


def test_3d_input_and_index(device):
    weight, bias, bank = make_bank(RANKS, DORA, device=device)
    g = generator(5)
    x = randn(3, 13, K, g=g, device=device, requires_grad=True)
    index = randint(-1, 5, (3, 13), g=g, device=device)
    check(x, weight, bias, bank, index, torch.float32)
    # a flattened index works the same (the forward has no atomics: bit-equal)
    y = multi_lora_linear(x, weight, bias, bank, index.reshape(-1))
    assert torch.equal(y, multi_lora_linear(x, weight, bias, bank, index))


def test_fp32_adapters_over_fp16_base(device):
    weight, bias, bank = make_bank([4, 16], [False, True], device=device)
    g = generator(6)
    x = randn(37, K, g=g, device=device, dtype=torch.float16, requires_grad=True)
    index = randint(-1, 2, (37,), g=g, device=device)
    check(x, weight.half(), bias.half(), bank, index, torch.float16)


def test_trainable_base_and_expanded_gradient(device):
    """The base weight/bias gradients (DoRA rows scale W's), and y.sum()'s stride-0 dy."""
    weight, bias, bank = make_bank(RANKS, DORA, device=device)
    weight.requires_grad_()
    bias.requires_grad_()
    g = generator(7)
    x = randn(50, K, g=g, device=device, requires_grad=True)
    index = randint(-1, 5, (50,), g=g, device=device)
    y = multi_lora_linear(x, weight, bias, bank, index)
    y.sum().backward()
    compare(reference_fn(bank, index), [x, weight, bias, bank.A, bank.B, bank.magnitude], y,
            torch.ones_like(y), torch.float32, NAMES)


def test_dropout_matches_reference_with_same_masks(multi_path, device):
    p = (0.3, 0.0, 0.5)
    weight, bias, bank = make_bank([8, 1, 16], [False] * 3, device=device, dropout=p)
    assert bank.dropout.device == torch.device(device) and bank.dropout.dtype == torch.float32
    g = generator(8)
    index = randint(-1, 3, (60,), g=g, device=device)
    x = randn(60, K, g=g, device=device, requires_grad=True)
    mask = torch.ones(60, K, dtype=torch.bool, device=device)
    for a, pa in enumerate(p):
        mask[index == a] = dropout_mask(77, 60, K, pa, device=device)[index == a]
    y, _ = check(x, weight, bias, bank, index, torch.float32, training=True, seed=77, mask=mask)
    y_eval = multi_lora_linear(x, weight, bias, bank, index)
    assert not torch.allclose(y, y_eval)  # dropout did something
    assert torch.equal(y_eval, multi_lora_linear(x, weight, bias, bank, index, seed=3))
    fresh = lambda: multi_lora_linear(x, weight, bias, bank, index, training=True)  # noqa: E731
    assert not torch.equal(fresh(), fresh())  # a new seed per call


def test_training_copies_nothing_from_the_host(monkeypatch, device):
    """Dropout probabilities and DoRA flags live on the device in the bank: a training
    call reads nothing back (no .tolist()/.item()) and builds no tensor from host data, so
    it can be captured in a CUDA graph. (CPU tensors check the index range on the host.)"""
    weight, bias, bank = make_bank([8, 4, 16], [True, False, False], device=device,
                                   dropout=(0.0, 0.2, 0.1))
    assert not bank.dora_dropout
    g = generator(9)
    x = randn(30, K, g=g, device=device, requires_grad=True)
    index = randint(0, 3, (30,), g=g, device=device)

    def host_copy(*args, **kwargs):
        raise AssertionError("host round trip in multi_lora_linear")

    with monkeypatch.context() as patched:
        for name in ("tolist", "item"):
            patched.setattr(torch.Tensor, name, host_copy)
        patched.setattr(torch, "tensor", host_copy)
        y = multi_lora_linear(x, weight, bias, bank, index, training=True, seed=1)
    y.backward(upstream(y, 0))
    assert x.grad is not None and bank.A.grad is not None


def test_dora_with_dropout_in_training_runs_reference(monkeypatch, device):
    monkeypatch.setattr(functional, "_warned_dora_dropout", set())
    weight, bias, bank = make_bank([8, 4], [True, False], device=device, dropout=(0.2, 0.2))
    assert bank.dora_dropout
    g = generator(10)
    x = randn(20, K, g=g, device=device)
    index = randint(-1, 2, (20,), g=g, device=device)
    gen = lambda: torch.Generator(device=device).manual_seed(5)  # noqa: E731
    with pytest.warns(UserWarning, match="not fused"):
        y = multi_lora_linear(x, weight, bias, bank, index, training=True, generator=gen())
    ref = reference.multi_lora_linear(x, weight, bias, bank, index, training=True, generator=gen())
    assert torch.equal(y, ref)
    seeded = lambda s: multi_lora_linear(x, weight, bias, bank, index, training=True, seed=s)  # noqa: E731
    assert torch.equal(seeded(4), seeded(4)) and not torch.equal(seeded(4), seeded(5))


def test_empty_slots_and_empty_batch(device):
    """A rank-0 adapter (e.g. one that does not cover this layer) is the base; M = 0 works."""
    weight, bias, bank = make_bank([8, 4], [False, False], device=device)
    bank = replace(bank, ranks=torch.tensor([8, 0], dtype=torch.int32, device=device))
    x = randn(9, K, g=generator(11), device=device)
    y = multi_lora_linear(x, weight, bias, bank, torch.ones(9, dtype=torch.int64, device=device))
    assert_close(y, torch.nn.functional.linear(x, weight, bias).double(), torch.float32, "rank 0")
    empty = multi_lora_linear(x[:0], weight, bias, bank, torch.zeros(0, dtype=torch.int32, device=device))
    assert empty.shape == (0, N)


def test_torch_compile_fullgraph(device):
    weight, bias, bank = make_bank(RANKS, DORA, device=device)
    g = generator(12)
    x = randn(30, K, g=g, device=device, requires_grad=True)
    index = randint(-1, 5, (30,), g=g, device=device)
    fn = lambda x: multi_lora_linear(x, weight, bias, bank, index)  # noqa: E731
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(y, fn(x))  # no atomics in the forward
    dy = upstream(y, 0)
    y.backward(dy)
    compare(reference_fn(bank, index), [x, weight, bias, bank.A, bank.B, bank.magnitude], y, dy,
            torch.float32, NAMES)


def test_group_rows_is_a_stable_sort_with_segments(device):
    index = torch.tensor([2, -1, 0, 2, 1, -1, 0, 2], device=device)
    groups = group_rows(index, 4)
    assert groups.perm.tolist() == [2, 6, 4, 0, 3, 7, 1, 5]
    assert groups.keys.tolist() == [0, 0, 1, 2, 2, 2, 4, 4]
    assert groups.seg.tolist() == [0, 2, 3, 6, 6, 8]


def test_bad_index_raises():
    """On the CPU the index range is checked on the host (CPU tensors on every machine;
    on CUDA, see test_gpu_bad_index_is_a_device_assert)."""
    weight, bias, bank = make_bank([8, 4], [False, False])
    x = randn(10, K, g=generator(13))
    ok = torch.zeros(10, dtype=torch.int32)
    for bad in (2, -2):
        with pytest.raises(ValueError, match="outside -1 .. 1"):
            multi_lora_linear(x, weight, bias, bank, ok.clone().index_fill_(0, torch.tensor([3]), bad))
    with pytest.raises(ValueError, match="11 entries for 10 rows"):
        multi_lora_linear(x, weight, bias, bank, torch.zeros(11, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer tensor"):
        multi_lora_linear(x, weight, bias, bank, ok.float())
    with pytest.raises(TypeError, match="integer tensor"):
        multi_lora_linear(x, weight, bias, bank, ok.bool())
    with pytest.raises(TypeError, match="integer tensor"):
        multi_lora_linear(x, weight, bias, bank, [0] * 10)
    with pytest.raises(ValueError, match="adapter_index is on meta"):
        multi_lora_linear(x, weight, bias, bank, ok.to("meta"))


def test_bad_bank_raises(device):
    weight, bias, bank = make_bank([8, 4], [True, False], device=device)
    x = randn(10, K, g=generator(14), device=device)
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
    with pytest.raises(ValueError, match="go together"):
        replace(bank, magnitude=None)
    with pytest.raises(ValueError, match="dropout must be a float32 tensor"):
        replace(bank, dropout=(0.1, 0.2))
    with pytest.raises(ValueError, match="dropout must hold 2 probabilities"):
        pack_adapters([adapter(bank, 0), adapter(bank, 1)], weight=weight, dropout=[0.1])


def test_bad_bank_values_raise_on_cpu():
    """Values are checked where that costs no host sync: for CPU banks."""
    _, _, bank = make_bank([8, 4], [True, False])
    with pytest.raises(ValueError, match="exceed A's"):
        replace(bank, offsets=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside 0..max_rank"):
        replace(bank, max_rank=4)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\)"):
        replace(bank, dropout=torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="dora_dropout=False"):
        replace(bank, dropout=torch.tensor([0.1, 0.0]))
    assert replace(bank, dropout=torch.tensor([0.0, 0.3])).dora_dropout is False


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_bad_index_is_a_device_assert(tmp_path):
    """On CUDA an out-of-range index is not checked on the host (that would sync every
    decode step): a device-side assert fires at the next synchronization and poisons the
    CUDA context, so it is observed in a subprocess."""
    script = tmp_path / "bad_index.py"
    script.write_text(
        "import torch, fastlora\n"
        "from fastlora.adapters.packed import pack_adapters\n"
        "g = torch.Generator().manual_seed(0)\n"
        "w = torch.randn(48, 70, generator=g).cuda()\n"
        "a = [(torch.randn(4, 70, generator=g).cuda(), torch.randn(48, 4, generator=g).cuda(), 1.0)]\n"
        "x = torch.randn(5, 70, generator=g).cuda()\n"
        "y = fastlora.multi_lora_linear(x, w, None, pack_adapters(a), torch.tensor([0, 0, 3, 0, -1]).cuda())\n"
        "torch.cuda.synchronize()\n"
        "print('no error')\n")
    root = str(Path(__file__).resolve().parents[1])  # import this checkout's fastlora
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode != 0 and "no error" not in proc.stdout
    # recent PyTorch also prints the assert's message from the device
    assert "device-side assert" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.gpu_smoke
def test_gpu_multi_training_step_in_a_cuda_graph():
    """A multi-adapter training step (DoRA and dropout adapters) is captured once and
    replayed; each replay draws fresh dropout masks."""
    weight, bias, bank = make_bank([8, 4, 16], [True, False, False], device="cuda",
                                   dropout=(0.0, 0.2, 0.1))
    g = generator(15)
    x = randn(64, K, g=g, device="cuda", requires_grad=True)
    index = randint(-1, 3, (64,), g=g, device="cuda")
    dy = randn(64, N, g=g, device="cuda")
    out = {}

    def step():
        for t in (x, bank.A, bank.B, bank.magnitude):
            t.grad = None
        out["y"] = multi_lora_linear(x, weight, bias, bank, index, training=True)
        out["y"].backward(dy)

    graph = capture(step)
    graph.replay()
    first = out["y"].clone()
    graph.replay()
    assert not torch.equal(first, out["y"])
    assert torch.isfinite(x.grad).all() and torch.isfinite(bank.A.grad).all()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "dora-and-dropout"])
def test_multi_op_passes_opcheck_with_either_list_form(training, device):
    """The op takes the adapters' and rows' descriptors as two lists of optional tensors
    (``library.multi_args``). torch handles a list holding a None as one opaque input but
    flattens a list of tensors only (DoRA and dropout adapters; gathered rows that carry
    their groups for the backward): the op's schema, fake and autograd registration hold
    for both forms (opcheck), and the gradients match the reference in the second."""
    from fastlora.adapters.routing import Routing
    from fastlora.ops import library

    weight, bias, bank = make_bank([8, 4, 16], [True, False, False], device=device,
                                   dropout=(0.0, 0.2, 0.1))
    g = generator(16)
    x = randn(24, K, g=g, device=device, requires_grad=True)
    index = randint(0, 3, (24,), g=g, device=device)
    adapters, rows = library.multi_args(bank, Routing.from_index(index, bank.n), 24,
                                        dropout=training, grouped=True)
    assert any(t is None for t in adapters + rows) is not training
    seed = torch.full((1,), 5, dtype=torch.int64, device=device)
    args = (x, weight, bias, bank.A, bank.B, bank.magnitude, adapters, rows, bank.max_rank,
            seed if training else None)
    torch.library.opcheck(library.multi_lora_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    if training:
        mask = torch.ones(24, K, dtype=torch.bool, device=device)
        for a, pa in enumerate((0.0, 0.2, 0.1)):
            mask[index == a] = dropout_mask(5, 24, K, pa, device=device)[index == a]
        check(x, weight, bias, bank, index, torch.float32, training=True, seed=5, mask=mask)


def test_the_op_rebuilds_the_one_bank_type_unchecked(monkeypatch, device):
    """The launchers take the public bank type (``fastlora.PackedAdapters`` is
    ``fastlora.kernels.PackedAdapters``): the op rebuilds it of A, B, magnitude and its lists
    (``library.launch_meta``) with the bank's own tensors, without checking them again, and
    with dropout only where the call applies it (eval: None)."""
    from fastlora import kernels
    from fastlora.adapters.routing import Routing
    from fastlora.ops import library

    assert fastlora.PackedAdapters is kernels.PackedAdapters
    _, _, bank = make_bank([8, 4, 16], [True, False, False], device=device,
                           dropout=(0.0, 0.2, 0.1))
    routing = Routing.from_index(randint(-1, 3, (24,), g=generator(18), device=device), bank.n)

    def checked_again(self):
        raise AssertionError("launch_meta checked the bank again")

    monkeypatch.setattr(kernels.PackedAdapters, "__post_init__", checked_again)
    for training in (False, True):
        adapters, rows = library.multi_args(bank, routing, 24, dropout=training, grouped=False)
        meta, _ = library.launch_meta(bank.A, bank.B, bank.magnitude, adapters, rows,
                                      bank.max_rank)
        assert type(meta) is kernels.PackedAdapters
        for name in ("A", "B", "offsets", "ranks", "scales", "magnitude", "is_dora"):
            assert getattr(meta, name) is getattr(bank, name), name
        assert torch.equal(meta.weight_norm, bank.weight_norm)
        assert not meta.weight_norm.requires_grad
        assert meta.max_rank == bank.max_rank and meta.n == bank.n and meta.slots is None
        assert meta.dropout is (bank.dropout if training else None)
        assert kernels.dora_bank(meta).flags.dtype == torch.int8


def test_eager_recorded_call_skips_the_op_wrapper_with_the_same_result(device):
    """A call eager autograd records runs the op's forward, saved tensors and backward
    without the custom op's Python autograd wrapper (``library._MultiRecorded``: that
    wrapper flattens every argument as a pytree once the op takes lists): the forward
    dispatches no custom op, the backward the op layer's ``multi_lora_bwd``, and output
    and gradients equal those of the custom op called directly."""
    from fastlora.adapters.routing import Routing
    from fastlora.ops import library
    from spies import torch_ops

    weight, bias, bank = make_bank([8, 4, 16], [True, False, False], device=device)
    g = generator(17)
    x = randn(24, K, g=g, device=device, requires_grad=True)
    index = randint(-1, 3, (24,), g=g, device=device)
    leaves = (x, bank.A, bank.B, bank.magnitude)
    with torch_ops() as ops:
        y = multi_lora_linear(x, weight, bias, bank, index)
    assert not any(op.startswith("fastlora::") for op in ops.ops), ops.ops
    dy = upstream(y, 0)
    with torch_ops() as ops:
        eager = torch.autograd.grad(y, leaves, dy)
    assert "fastlora::multi_lora_bwd" in ops.ops

    adapters, rows = library.multi_args(bank, Routing.from_index(index, bank.n), 24,
                                        dropout=False, grouped=True)
    op_y = library.multi_lora_fwd(x, weight, bias, bank.A, bank.B, bank.magnitude, adapters,
                                  rows, bank.max_rank, None)[0]
    assert torch.equal(y, op_y)
    for name, got, want in zip(["x", "A", "B", "magnitude"], eager,
                               torch.autograd.grad(op_y, leaves, dy)):
        assert torch.equal(got, want), name
