"""evaluate.py's outputs: metrics.json, metrics.csv, metrics.md and a bar plot, for one or several folders."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from clif.eval.figures import metric_bars, save_figure
from clif.outputs.artifacts import atomic_write_bytes, atomic_write_json

COLUMNS = [
    "text_alignment",
    "text_cosine",
    "image_alignment",
    "dino_alignment",
    "attendance",
    "confusion_rate",
    "dc",  # MuDI's Detect-and-Compare (clif/eval/dc.py)
    "dc_zero_share",
]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def write_report(out: Path, results: dict[str, dict]) -> None:
    """results: label -> {"summary": ..., "per_prompt": [...], "rows": [...]}."""
    atomic_write_json(out / "metrics.json", results)
    cols = [c for c in COLUMNS if any(r["summary"].get(c) is not None for r in results.values())]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "prompt", "images", *cols])
    for label, r in results.items():
        w.writerow([label, "ALL", r["summary"]["images"], *[r["summary"].get(c) for c in cols]])
        for p in r["per_prompt"]:
            w.writerow([label, p["prompt"], p["images"], *[p.get(c) for c in cols]])
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    lines = ["| method | images | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for label, r in results.items():
        s = r["summary"]
        lines.append(f"| {label} | {s['images']} | " + " | ".join(_fmt(s.get(c)) for c in cols) + " |")
    lines += ["", "Per prompt:", "", "| method | prompt | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for label, r in results.items():
        for p in r["per_prompt"]:
            lines.append(f"| {label} | {p['prompt']} | " + " | ".join(_fmt(p.get(c)) for c in cols) + " |")
    atomic_write_bytes(out / "metrics.md", ("\n".join(lines) + "\n").encode())
    save_figure(metric_bars(results, cols), out / "metrics.png")
