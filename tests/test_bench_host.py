"""The host benchmark runs on the CPU and gives its table: every path in both modes, with
Python call counts, of the backward too with grad (no timing is asserted)."""
from bench_host import COLUMNS, MODES, measure
from tables import markdown_table


def test_host_benchmark_gives_every_path_and_mode(device):
    rows = measure(k=32, n=16, r=4, rounds=1, device=device, wall=False)
    paths = ("peft", "nn.LoraLinear", "patched peft", "serve decode")
    assert [(r["path"], r["mode"]) for r in rows] == [(p, m) for m in MODES for p in paths]
    for row in rows:
        assert isinstance(row["calls"], int) and row["calls"] > 3  # Module.__call__ and forward
        assert row["host_us"] > 0
        # with grad, the backward's calls too (torch.autograd.backward's at least)
        assert (row["mode"] == "grad") == isinstance(row.get("bwd_calls"), int)
        assert row.get("bwd_calls", 4) > 3
    table = markdown_table(rows, COLUMNS)
    assert table.count("\n") == len(rows) + 2


def test_no_eval_path_makes_more_python_calls_than_peft(device):
    """Issue 21's target: a steady-state call of every fastlora path (eval), and of the
    patched and drop-in layers with grad, runs no more Python than PEFT's unpatched layer.
    (The served layer with grad, a trainable base the server never has, is not held to it.)
    Their backward is planned too: it adds to ``torch.autograd.backward``'s own Python (all
    of PEFT's) the autograd function's call and the plan's launches, no op dispatch or
    argument building (67 calls before it was planned, against PEFT's 17)."""
    rows = measure(k=32, n=16, r=4, rounds=1, device=device, wall=False)
    calls = {(r["path"], r["mode"]): r["calls"] for r in rows}
    for path in ("nn.LoraLinear", "patched peft", "serve decode"):
        assert calls[path, "eval"] <= calls["peft", "eval"], calls
    bwd = {r["path"]: r["bwd_calls"] for r in rows if r["mode"] == "grad"}
    for path in ("nn.LoraLinear", "patched peft"):
        assert calls[path, "grad"] <= calls["peft", "grad"], calls
        assert bwd[path] <= bwd["peft"] + 10, bwd
