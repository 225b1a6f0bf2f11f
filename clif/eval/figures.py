"""evaluate.py's figures (matplotlib): metrics.png, the summary metrics per method, and pairs.png, D&C and CLIF's
confusion rate per concept pair, one bar per method."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from clif.outputs.artifacts import atomic_write_bytes

PANELS = (("dc", "D&C (higher = less mixing)"), ("confusion_rate", "confusion rate (lower = better)"))


def bar_values(per_pair: dict[str, list[dict]]) -> tuple[list[str], list[tuple], list[tuple[str, str]], dict]:
    """(methods, pairs, panels, {(method, pair, metric): value}) of what `pair_bars` draws.

    A label 'METHOD:anything' counts as METHOD, so one folder per (method, pair) still gives one bar per method.
    Pairs without images (listed by --pairs) are left out.
    """
    merged: dict[str, list[dict]] = {}
    for label, rows in per_pair.items():
        merged.setdefault(label.split(":", 1)[0], []).extend(e for e in rows if e.get("images"))
    pairs = sorted({tuple(e["pair"]) for rows in merged.values() for e in rows})
    panels = [(k, t) for k, t in PANELS if any(e.get(k) is not None for rows in merged.values() for e in rows)]
    value = {(m, tuple(e["pair"]), k): e.get(k) for m, rows in merged.items() for e in rows for k, _ in panels}
    return list(merged), pairs, panels, value


def pair_bars(per_pair: dict[str, list[dict]], path: Path) -> bool:
    """per_pair: label -> [{"pair": [a, b], "dc": ..., "confusion_rate": ...}, ...]. False if nothing to draw.

    One panel per metric that any method has; groups = pairs, bars = methods; a missing value leaves a gap.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    labels, pairs, panels, value = bar_values(per_pair)
    if not pairs or not panels:
        return False
    width = 0.8 / max(1, len(labels))
    fig = Figure(
        figsize=(max(5.0, 1.2 * len(pairs) * max(1, len(labels)) ** 0.5 + 2), 3.2 * len(panels)), layout="constrained"
    )
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)[:, 0])
    x = np.arange(len(pairs))
    for ax, (key, title) in zip(axes, panels):
        for i, m in enumerate(labels):
            ys = [value.get((m, p, key)) for p in pairs]
            bars = ax.bar(
                x + (i - (len(labels) - 1) / 2) * width, [np.nan if y is None else y for y in ys], width, label=m
            )
            ax.bar_label(bars, labels=["" if y is None else f"{y:.2f}" for y in ys], fontsize=7)
        ax.set_xticks(x, labels=[" / ".join(p) for p in pairs], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(min(0.0, *[v for (_, _, k), v in value.items() if k == key and v is not None]), 1.0)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    save_figure(fig, path)
    return True


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def metric_bars(results: dict[str, dict], cols: list[str]):
    """metrics.png's figure: grouped bars, one group per metric, one bar per method (values in [0, 1]; CLIPScore
    divided by 2.5), each bar labelled with its value."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    labels = list(results)
    names = [c.replace("_", " ") + (" / 2.5" if c == "text_alignment" else "") for c in cols]
    fig = Figure(figsize=(max(5.0, 1.1 * len(cols) * max(1, len(labels)) ** 0.5 + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(cols))
    for i, label in enumerate(labels):
        ys = [results[label]["summary"].get(c) for c in cols]
        ys = [None if y is None else y / 2.5 if c == "text_alignment" else y for y, c in zip(ys, cols)]
        bars = ax.bar(
            x + (i - (len(labels) - 1) / 2) * width, [np.nan if y is None else y for y in ys], width, label=label
        )
        ax.bar_label(bars, labels=["" if y is None else f"{y:.2f}" for y in ys], fontsize=7)
    ax.set_xticks(x, labels=names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(min([0.0] + [v for r in results.values() for c in cols if (v := r["summary"].get(c)) is not None]), 1.0)
    ax.set_title("CLIF evaluation", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return fig
