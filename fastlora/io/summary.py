"""What an adapter holds, for people (``print(adapter)``, ``fastlora inspect``) and scripts
(``fastlora inspect --json``): counts, ranks, alphas, scales, dtypes, sizes, base-model guess."""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from .family import guess_family


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_text(t: torch.Tensor) -> str:
    return f"[{', '.join(map(str, t.shape))}]"


def size_text(n: int) -> str:
    size, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in [header, *rows])


def json_number(value: float) -> int | float:
    """``value`` as an int when it is whole (``4`` rather than ``4.0`` in JSON and tables)."""
    return int(value) if float(value).is_integer() else value


def layer_info(layer) -> dict[str, Any]:
    """One layer as plain data: kind, rank (None: a full LoKr), alpha, scale, shape, dtype, extras."""
    return {"kind": layer.kind, "rank": layer.rank, "alpha": json_number(layer.alpha), "scale": layer.scale,
            "shape": [layer.out_features, *layer.in_shape], "conv": layer.is_conv,
            "dtype": dtype_name(layer.dtype), "dora": layer.magnitude is not None,
            "lora_b_bias": layer.bias is not None, "parameters": layer.num_parameters(),
            "bytes": sum(t.numel() * t.element_size() for t in layer.tensors())}


def _group_order(item) -> tuple:
    (kind, rank, alpha, scale, dtype), count = item
    return -count, kind, -1 if rank is None else rank, alpha, dtype


def summarize(adapter) -> dict[str, Any]:
    """The adapter as plain data (the ``--json`` output, less the file fields)."""
    infos = {name: layer_info(layer) for name, layer in adapter.layers.items()}
    groups = Counter((i["kind"], i["rank"], i["alpha"], i["scale"], i["dtype"]) for i in infos.values())
    return {
        "format": adapter.source_format,
        "base_model_guess": guess_family(adapter.layers),
        "layers": len(infos),
        "conv_layers": sum(i["conv"] for i in infos.values()),
        "kinds": dict(Counter(i["kind"] for i in infos.values())),
        "parameters": adapter.num_parameters(),
        "tensor_bytes": sum(i["bytes"] for i in infos.values()),
        "dtypes": sorted({i["dtype"] for i in infos.values()}),
        "rslora": adapter.use_rslora, "dora": adapter.use_dora,
        "lora_b_bias": any(i["lora_b_bias"] for i in infos.values()),
        "groups": [{"kind": k, "rank": r, "alpha": a, "scale": s, "dtype": d, "layers": n}
                   for (k, r, a, s, d), n in sorted(groups.items(), key=_group_order)],
        "config": dict(adapter.config),
        "skipped_keys": list(adapter.skipped),
        "layer_info": infos,
    }


def _rank(rank) -> str:
    return "full" if rank is None else str(rank)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as text lines, then a table of layers grouped by kind, rank, alpha, scale, dtype."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in summary["kinds"].items())
    conv = summary["conv_layers"]
    skipped = summary["skipped_keys"]
    lines = [
        f"format:      {summary['format']}",
        f"base model:  {summary['base_model_guess']} (guessed from the layer names)",
        f"layers:      {summary['layers']} ({summary['layers'] - conv} linear, {conv} conv; {kinds})",
        f"parameters:  {summary['parameters']:,} ({size_text(summary['tensor_bytes'])})",
        f"dtypes:      {', '.join(summary['dtypes'])}",
        f"rsLoRA: {_yes_no(summary['rslora'])}   DoRA: {_yes_no(summary['dora'])}   "
        f"lora_B bias: {_yes_no(summary['lora_b_bias'])}",
        *(f"{key}: {value}" for key, value in summary["config"].items()),
    ]
    if skipped:
        lines.append(f"skipped:     {len(skipped)} non-adapter tensors ({', '.join(skipped[:3])}"
                     f"{', ...' if len(skipped) > 3 else ''})")
    rows = [[g["kind"], _rank(g["rank"]), f"{g['alpha']:g}", f"{g['scale']:.6g}", g["dtype"], str(g["layers"])]
            for g in summary["groups"]]
    return [*lines, "", table(["kind", "rank", "alpha", "scale", "dtype", "layers"], rows)]


def layer_table(summary: dict[str, Any]) -> str:
    """One row per layer."""
    rows = [[name, i["kind"], "conv" if i["conv"] else "linear", _rank(i["rank"]), f"{i['alpha']:g}",
             f"{i['scale']:.6g}", f"[{', '.join(map(str, i['shape']))}]", i["dtype"]]
            for name, i in summary["layer_info"].items()]
    return table(["layer", "kind", "module", "rank", "alpha", "scale", "weight change", "dtype"], rows)


def summary_text(adapter) -> str:
    return "\n".join(summary_lines(summarize(adapter)))


def one_line(adapter) -> str:
    """``kohya, 2 layers (lora), ranks 6/8, 204 parameters, float32``."""
    layers = adapter.layers.values()
    ranks = "/".join(_rank(r) for r in sorted({layer.rank for layer in layers}, key=lambda r: (r is None, r)))
    kinds = "/".join(sorted({layer.kind for layer in layers}))
    dtypes = "/".join(sorted({dtype_name(layer.dtype) for layer in layers}))
    return (f"{adapter.source_format}, {len(adapter.layers)} layers ({kinds}), ranks {ranks}, "
            f"{adapter.num_parameters():,} parameters, {dtypes}")
