"""evaluate.py's outputs: metrics.json, metrics.csv, metrics.md and a bar plot, for one or several folders."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image, ImageDraw

from clif.images import save_png
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
    save_png(bar_plot(results, cols), out / "metrics.png")


def bar_plot(results: dict[str, dict], cols: list[str]) -> Image.Image:
    """Grouped bars: one group per metric, one bar per method (values in [0, 1]; CLIPScore divided by 2.5)."""
    palette = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193)]
    labels = list(results)
    gw, bw, h, top = 40 + 28 * len(labels), 24, 240, 30
    img = Image.new("RGB", (60 + gw * len(cols), h + top + 60 + 16 * len(labels)), "white")
    d = ImageDraw.Draw(img)
    d.line((50, top, 50, top + h), fill="black")
    d.line((50, top + h, img.width - 10, top + h), fill="black")
    for tick in (0.0, 0.5, 1.0):
        y = top + h - int(tick * h)
        d.text((20, y - 6), f"{tick:.1f}", fill="black")
    for gi, col in enumerate(cols):
        x0 = 60 + gi * gw
        for li, label in enumerate(labels):
            v = results[label]["summary"].get(col)
            if v is None:
                continue
            v = v / 2.5 if col == "text_alignment" else v
            y = top + h - int(max(0.0, min(1.0, v)) * h)
            d.rectangle((x0 + li * 28, y, x0 + li * 28 + bw, top + h), fill=palette[li % len(palette)])
        d.text((x0, top + h + 6), col.replace("_", " ")[:18], fill="black")
    for li, label in enumerate(labels):
        y = top + h + 30 + 16 * li
        d.rectangle((60, y, 72, y + 10), fill=palette[li % len(palette)])
        d.text((80, y - 2), label, fill="black")
    d.text((60, 8), "CLIF evaluation (text alignment shown / 2.5)", fill="black")
    return img
