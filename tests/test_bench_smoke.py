"""The layer benchmark compares like with like: its implementations agree (CPU, tiny),
fastlora's forced ones included."""
import os

import pytest
import torch

from data import generator, randn

from bench_layer import make_impls
from common import forced_impl, saved_bytes
from tables import markdown


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_benchmarked_implementations_agree(adapter_dtype, device):
    impls = make_impls(64, 48, 8, 0.0, torch.float16, adapter_dtype, device=device)
    x = randn(19, 64, g=generator(0), device=device, dtype=torch.float16)
    outs = {name: fn(x).float() for name, (fn, _) in impls.items()}
    lora_delta = (outs["eager"] - outs["F.linear"]).abs().max()
    assert lora_delta > 1e-2  # the adapter is non-zero, so the comparison means something
    for name in ("peft", "fastlora"):
        assert torch.allclose(outs[name], outs["eager"], atol=2e-2, rtol=1e-2), name


def test_fastlora_saves_no_more_than_x_and_t(device):
    impls = make_impls(64, 48, 8, 0.1, torch.float32, torch.float32, device=device)
    x = randn(19, 64, g=generator(1), device=device, requires_grad=True)
    fn, _ = impls["fastlora"]
    saved = saved_bytes(lambda: fn(x))
    x_bytes, t_bytes = x.numel() * 4, 19 * 8 * 4
    weights = sum(t.numel() * t.element_size() for t in (impls["peft"][0].base_layer.weight,
                                                         *impls["peft"][1]))
    assert saved <= x_bytes + t_bytes + weights + 64  # + the seed
    assert saved < saved_bytes(lambda: impls["peft"][0](x))


def test_dora_benchmark_implementations_agree(device):
    from bench_dora import make_impls as make_dora_impls

    impls = make_dora_impls(64, 48, 8, torch.float32, torch.float32, device=device)
    x = randn(19, 64, g=generator(2), device=device)
    peft_out = impls["peft-dora"][0](x)
    assert torch.allclose(impls["fastlora-dora"][0](x), peft_out, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(impls["fastlora-lora"][0](x), peft_out, atol=1e-4)


def test_forced_implementations_agree(monkeypatch, device):
    """The layer benchmark's fastlora[IMPL] rows: the same layer under FASTLORA_IMPL=IMPL
    (forward and backward), which the context restores afterwards."""
    monkeypatch.setenv("FASTLORA_IMPL", "fused")
    impls = make_impls(72, 48, 8, 0.0, torch.float32, torch.float32, device=device)
    x = randn(19, 72, g=generator(3), device=device, requires_grad=True)
    fn, params = impls["fastlora"]
    dy = randn(19, 48, g=generator(4), device=device)
    eager = impls["eager"][0](x)
    eager.backward(dy)
    want = [x.grad, *(p.grad for p in params)]
    hopper = not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] == 9
    for name in ("fused", "cublas", "tma") if hopper else ("fused", "cublas"):
        for t in (x, *params):
            t.grad = None
        with forced_impl(name):
            assert os.environ["FASTLORA_IMPL"] == name
            out = fn(x)
            out.backward(dy)
        torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
        for got, ref in zip([x.grad, *(p.grad for p in params)], want):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert os.environ["FASTLORA_IMPL"] == "fused"


def test_result_markdown_has_the_explain_appendix():
    data = {"env": {"dry_run": True, "torch": "t", "triton": "t", "date": "d"}, "notes": [],
            "columns": ["impl", "choice"],
            "rows": [{"impl": "fastlora", "choice": "forward=cublas dx=fused"}],
            "appendix": {"fastlora.explain": ["forward [m1 ...]: cublas (measured: ...)"]}}
    text = markdown(data, "preamble")
    assert text.endswith("### fastlora.explain\n\n```\nforward [m1 ...]: cublas (measured: "
                         "...)\n```\n")


def test_4bit_model_benchmark_compares_like_with_like():
    """bench_model.py --quant4: the decoder layers' linears are bitsandbytes NF4 (nested
    absmax) under PEFT's bitsandbytes LoRA layer, every one patched, and the patched logits
    match PEFT's."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from bench_model import build_model, check_outputs, parse_args
    from common import Run
    import fastlora

    args = parse_args(["--quant4", "--dry-run"])
    run = Run("bench_model.py", True, None)
    with torch.random.fork_rng():  # the model's initialisation draws from torch's RNG
        torch.manual_seed(0)
        model = build_model(args, run)
    lora = [m for m in model.modules() if isinstance(m, PeftLinear4bit)]
    assert len(lora) == 7 * args.layers
    for layer in lora:
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit) and base.compute_dtype == run.half
        state = base.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
    assert type(model.base_model.model.lm_head) is torch.nn.Linear  # stays 16-bit
    report = fastlora.patch(model)
    assert report.all_patched and len(report.patched) == len(lora)
    check = check_outputs(model, args, run)
    assert check["logits_max_abs"] > 0.1 and check["relative"] < 5e-3
