"""Figures and tables of the toy world: pretraining sample grids and loss curves, the experiment's table and
its side-by-side figure (matplotlib, readable labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SAMPLE_CAPTIONS = (
    "a yellow ball with purple dots on the left and a blue box on the right",
    "a blue box on the left and a yellow ball with purple dots on the right",
    "a red star",
    "a green cup with white stripes on the right",
    "a pink ring on the left",
    "a small black heart with yellow checks",
    "a yellow ball with green stripes on the left and a yellow ball with purple dots on the right",
    "a white box with red checks and a black spot on the left and an orange star on the right",
)


def sample_grid(pipe, path: Path, captions=SAMPLE_CAPTIONS, seeds=(0, 1, 2), steps: int = 30, guidance: float = 4.0):
    """A matplotlib grid: one row per caption, one column per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(captions), len(seeds), figsize=(1.6 * len(seeds) + 4.2, 1.6 * len(captions)), squeeze=False
    )
    for r, cap in enumerate(captions):
        for c, s in enumerate(seeds):
            img = pipe(
                cap,
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="pil",
                generator=torch.Generator().manual_seed(s),
            ).images[0]
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel("\n".join(_wrap(cap, 34)), rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(f"seed {s}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def plot_losses(logs: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3), squeeze=False)
    for ax, (name, log) in zip(axes[0], logs.items()):
        k = max(1, len(log) // 100)
        sm = np.convolve(log, np.ones(k) / k, mode="valid") if len(log) >= k else log
        ax.plot(sm)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def side_by_side(folders: dict[str, Path], path: Path, per_prompt: int = 4) -> None:
    """Same prompts, same seeds: one column block per method (matplotlib, prompts as row labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(folders)
    first = folders[methods[0]]
    metas = [json.loads(p.read_text()) for p in sorted(first.glob("*.json")) if "prompt" in json.loads(p.read_text())]
    prompts = list(dict.fromkeys(m["prompt"] for m in metas))[:2]
    fig, axes = plt.subplots(
        len(prompts),
        len(methods) * per_prompt,
        figsize=(1.1 * len(methods) * per_prompt + 1, 1.4 * len(prompts) + 0.6),
        squeeze=False,
    )
    for r, prompt in enumerate(prompts):
        for mi, m in enumerate(methods):
            files = [p for p in sorted(folders[m].glob("*.json")) if json.loads(p.read_text()).get("prompt") == prompt]
            for k in range(per_prompt):
                ax = axes[r][mi * per_prompt + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(files):
                    ax.imshow(Image.open(files[k].with_suffix(".png")), interpolation="nearest")
                if r == 0 and k == 0:
                    ax.set_title(m, fontsize=9, loc="left")
                if mi == 0 and k == 0:
                    ax.set_ylabel(
                        prompt.replace(" on the ", "\non the "), rotation=0, ha="right", va="center", fontsize=7
                    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aggregate(per_seed: dict) -> dict:
    """mean ± std over seeds of every numeric metric, per method."""
    table = {}
    for method, runs in per_seed.items():
        keys = sorted(
            {k for r in runs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        table[method] = {
            k: (float(np.mean([r[k] for r in runs if k in r])), float(np.std([r[k] for r in runs if k in r])))
            for k in keys
        }
    return table


def write_table(table: dict, path: Path, seeds: list[int], times: dict, stage1: dict | None = None) -> str:
    cols = [
        "oracle_confusion",
        "oracle_correct",
        "oracle_swapped",
        "text_alignment",
        "image_alignment",
        "attendance",
        "confusion_rate",
    ]
    lines = [
        f"Seeds: {seeds}. mean ± std over seeds (oracle: fraction of two-concept images).",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m, vals in table.items():
        cells = [f"{vals[c][0]:.3f} ± {vals[c][1]:.3f}" if c in vals else "–" for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for seed, d in (stage1 or {}).items():
        if "before" in d and "after" in d:
            lines.append(
                f"\nStage-1 retrieval accuracy with the world CLIP, {seed} ({d.get('views', 'views')}): "
                f"{d['before']['accuracy']:.3f} before -> {d['after']['accuracy']:.3f} after"
            )
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(times.items()))]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
