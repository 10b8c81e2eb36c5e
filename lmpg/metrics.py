"""Writing metrics and samples: one JSON line per iteration, appended and flushed."""

from __future__ import annotations

import json
import math
from pathlib import Path


def clean(value):
    """JSON-safe value: NaN/inf become None, tensors/numpy become Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


class JsonlWriter:
    """Appends one JSON object per line to `path`, flushing each so a kill loses no line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(clean(record), sort_keys=False) + "\n")

    def truncate_to(self, num_lines: int) -> None:
        """Keep the first num_lines lines (resume drops lines written after the checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)[:num_lines]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.path)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_metrics_line(m: dict) -> str:
    """A compact one-line summary of an iteration for the console."""
    parts = [f"it {m['iteration']:>4d}", f"reward {m['reward_mean']:.3f}±{m['reward_std']:.3f}"]
    for key, label, fmt in (("kl", "kl", ".4f"), ("entropy", "ent", ".3f"), ("loss", "loss", ".4f"),
                            ("clip_frac", "clip", ".3f"), ("completion_len_mean", "len", ".1f"),
                            ("tokens_per_s", "tok/s", ".0f")):
        v = m.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{label} {v:{fmt}}")
    return " | ".join(parts)
