"""``PatchReport``: what ``fastlora.patch`` did to each LoRA layer of a model, and why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class LayerReport:
    """One LoRA (or other tuner) layer: patched or not, why, and notes on runtime fallbacks."""
    name: str
    layer_type: str
    base_type: str
    adapters: tuple[str, ...]
    patched: bool
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "patched" if self.patched else "NOT patched"


@dataclass
class PatchReport:
    """What ``fastlora.patch`` did to each tuner layer of a model; ``print`` it for a table."""
    layers: list[LayerReport]

    @property
    def patched(self) -> list[str]:
        """Names of the layers whose forward is now fastlora's."""
        return [e.name for e in self.layers if e.patched]

    @property
    def not_patched(self) -> dict[str, str]:
        """Layer name -> why it was left to PEFT."""
        return {e.name: e.reason for e in self.layers if not e.patched}

    @property
    def all_patched(self) -> bool:
        return all(e.patched for e in self.layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for e in self.layers:
            if e.name == name:
                return e
        raise KeyError(name)

    def summary(self) -> str:
        n, k = len(self.layers), len(self.patched)
        line = f"fastlora.patch: {k} of {n} LoRA layer{'s' if n != 1 else ''} patched"
        if k < n:
            reasons: dict[str, int] = {}
            for e in self.layers:
                if not e.patched:
                    reasons[e.reason] = reasons.get(e.reason, 0) + 1
            line += "; not patched: " + "; ".join(f"{c} x {r}" for r, c in reasons.items())
        return line

    def to_dict(self) -> dict:
        return {"patched": len(self.patched), "total": len(self.layers),
                "layers": [{"name": e.name, "layer_type": e.layer_type, "base_type": e.base_type,
                            "adapters": list(e.adapters), "patched": e.patched,
                            "reason": e.reason, "notes": list(e.notes)} for e in self.layers]}

    def __str__(self) -> str:
        header = ("layer", "type", "base", "adapters", "status", "reason / notes")
        rows = []
        for e in self.layers:
            why = e.reason if not e.patched else "; ".join(e.notes)
            rows.append((e.name, e.layer_type, e.base_type, ",".join(e.adapters), e.status, why))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(header[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [self.summary(), fmt.format(*header), fmt.format(*("-" * w for w in widths), "-" * 14)]
        lines += [fmt.format(*r).rstrip() for r in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<PatchReport {len(self.patched)}/{len(self.layers)} patched>"


# --------------------------------------------------------------------------------------
