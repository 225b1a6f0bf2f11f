"""Figures of the training stages, drawn with matplotlib (no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from clif.outputs.artifacts import atomic_write_bytes


def confusion_figure(rows: list[tuple[str, dict, dict]], path: Path) -> None:
    """A grid of confusion heat maps: one row per (label, before, after), columns before | after.

    Each result holds "matrix" (rows: text of concept i, columns: share of retrieved views of concept j),
    "concepts" and "accuracy".
    """
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    n = max(len(b["concepts"]) for _, b, _ in rows)
    side = 2.2 + 0.55 * n
    fig = Figure(figsize=(2 * side + 1.0, side * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), 2, squeeze=False))
    image = None
    for r, (label, before, after) in enumerate(rows):
        for c, (when, res) in enumerate((("before", before), ("after", after))):
            ax, m, names = axes[r, c], np.asarray(res["matrix"], dtype=float), res["concepts"]
            image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="Blues")
            ticks = range(len(names))
            ax.set_xticks(ticks, labels=names, rotation=40, ha="right", fontsize=9)
            ax.set_yticks(ticks, labels=names, fontsize=9)
            for i in ticks:
                for j in ticks:
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if m[i, j] > 0.6 else "black",
                    )
            ax.set_title(f"{label} — {when} (accuracy {res['accuracy']:.2f})", fontsize=10)
            ax.set_xlabel("concept of the retrieved views")
            ax.set_ylabel("text prompt of concept")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of top-k retrieved views")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
