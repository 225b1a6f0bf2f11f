"""Figures of the concepts' cross-attention maps (mean over layers and steps) beside the image they made."""

from __future__ import annotations

from pathlib import Path

import torch


def _figure(rows: list[tuple[str, object, torch.Tensor, list[str]]], path: Path) -> None:
    """One row per (label, image, maps [C, H, W], concept names): the image, then each concept's map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clif.outputs.artifacts import atomic_write_bytes

    cols = 1 + max(m.shape[0] for _, _, m, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
    for r, (label, image, maps, names) in enumerate(rows):
        axes[r][0].imshow(image)
        axes[r][0].set_title(label, fontsize=8)
        for c in range(cols - 1):
            ax = axes[r][c + 1]
            if c < maps.shape[0]:
                m = maps[c].float()
                ax.imshow(image, alpha=0.35)
                ax.imshow(
                    m.numpy(),
                    cmap="magma",
                    alpha=0.75,
                    extent=(0, image.width, image.height, 0),
                    vmin=0,
                    vmax=float(maps.max()) or 1.0,
                )
                ax.set_title(f"{names[c]} attention", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_maps(image, maps: torch.Tensor, names: list[str], path: Path) -> None:
    """`image` and its maps [C, H, W] (one per concept token, in `names` order) as one figure."""
    _figure([("image", image, maps, names)], path)


def maps_grid(rows: list[tuple[str, object, torch.Tensor, list[str]]], path: Path) -> None:
    """Several images with their maps, one row each (e.g. one per method, same seed and prompt)."""
    _figure(rows, path)
