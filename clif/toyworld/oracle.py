"""The oracle: a small CNN that says which custom concept (or neither) stands in one half of an image.

Trained on rendered half-crops: each concept in the left or right slot with a random neighbour (or none), and
as negatives the class's other instances (same class and colour, other patterns / pattern colours: the
look-alikes' mixtures among them), random objects and empty halves. Only a toy world can have this referee.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .world import COLORS, PATTERNS, Obj, Scene, random_background, random_obj, render

OTHER = "other"


def _net(n_classes: int) -> torch.nn.Module:
    c = torch.nn
    return c.Sequential(
        c.Conv2d(3, 32, 3, padding=1), c.GELU(), c.Conv2d(32, 32, 3, padding=1), c.GELU(), c.MaxPool2d(2),
        c.Conv2d(32, 64, 3, padding=1), c.GELU(), c.Conv2d(64, 64, 3, padding=1), c.GELU(), c.MaxPool2d(2),
        c.AdaptiveAvgPool2d((2, 1)), c.Flatten(), c.Linear(128, 64), c.GELU(), c.Linear(64, n_classes))


def _negatives(concepts: dict[str, Obj], rng: np.random.Generator) -> Obj:
    """Same class and colour as a concept but another pattern, pattern colour or mark; or any object."""
    if rng.random() < 0.6:
        ref = list(concepts.values())[rng.integers(len(concepts))]
        while True:
            o = replace(ref, pattern=PATTERNS[rng.integers(len(PATTERNS))],
                        pattern_color=list(COLORS)[rng.integers(len(COLORS))])
            if all((o.pattern, o.pattern_color) != (c.pattern, c.pattern_color) for c in concepts.values()) and \
                    o.pattern_color != o.color:
                return o
    return random_obj(rng, "center")


def half_crops(concepts: dict[str, Obj], n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` labelled half-images [n, size, size//2, 3] (label = concept index, len(concepts) = other)."""
    rng = np.random.default_rng(seed)
    names = list(concepts)
    xs, ys = np.empty((n, size, size // 2, 3), np.uint8), np.empty(n, np.int64)
    for i in range(n):
        side = ("left", "right")[rng.integers(2)]
        label = int(rng.integers(len(names) + 1))
        if label < len(names):
            obj = concepts[names[label]]
        else:
            obj = _negatives(concepts, rng) if rng.random() < 0.85 else None
        objs = []
        if obj is not None:
            objs.append(replace(obj, slot=side, dy=float(rng.uniform(-0.1, 0.1)),
                                size=obj.size if rng.random() < 0.8 else ("small", "large")[rng.integers(2)]))
        if rng.random() < 0.7:
            objs.append(random_obj(rng, "right" if side == "left" else "left"))
        img = np.asarray(render(Scene(tuple(objs), random_background(rng), int(rng.integers(2**31))), size)[0])
        xs[i] = img[:, : size // 2] if side == "left" else img[:, size // 2 :]
        ys[i] = label
    return xs, ys


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


class Oracle:
    def __init__(self, net: torch.nn.Module, names: list[str], heldout_accuracy: float):
        self.net, self.names, self.heldout_accuracy = net.eval(), names, heldout_accuracy

    @torch.no_grad()
    def predict(self, halves: np.ndarray) -> list[str]:
        idx = self.net(_tensor(halves)).argmax(1).tolist()
        return [self.names[i] if i < len(self.names) else OTHER for i in idx]

    def halves(self, img: Image.Image) -> tuple[str, str]:
        a = np.asarray(img.convert("RGB"))
        w = a.shape[1] // 2
        left, right = self.predict(np.stack([a[:, :w], a[:, w : 2 * w]]))
        return left, right


def train_oracle(concepts: dict[str, Obj], size: int, out: Path, steps: int = 1500, n_train: int = 6000,
                 seed: int = 0) -> Oracle:
    """Train (or load from `out`) the oracle; held-out accuracy on fresh renders is stored with it."""
    from safetensors.torch import load_file, save_file

    names = list(concepts)
    net = _net(len(names) + 1)
    wfile, meta = out / "oracle.safetensors", out / "oracle.json"
    if wfile.exists() and meta.exists():
        net.load_state_dict(load_file(str(wfile)))
        return Oracle(net, names, json.loads(meta.read_text())["heldout_accuracy"])
    torch.manual_seed(seed)
    xs, ys = half_crops(concepts, n_train, size, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = _tensor(xs), torch.from_numpy(ys)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(ys), (128,), generator=g)
        x = x_all[idx]
        # robustness to generated images: brightness/colour jitter, pixel noise, 1-px shifts
        x = x * (1 + 0.1 * torch.randn(len(idx), 3, 1, 1, generator=g)) + 0.05 * torch.randn(x.shape, generator=g)
        x = torch.roll(x, shifts=(int(torch.randint(-1, 2, (1,), generator=g)), int(torch.randint(-1, 2, (1,), generator=g))),
                       dims=(2, 3))
        loss = F.cross_entropy(net(x), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        for grp in opt.param_groups:
            grp["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
    net.eval()
    hx, hy = half_crops(concepts, 1500, size, seed + 1)
    with torch.no_grad():
        acc = float((net(_tensor(hx)).argmax(1) == torch.from_numpy(hy)).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(wfile))
    meta.write_text(json.dumps({"heldout_accuracy": acc, "names": names, "steps": steps, "n_train": n_train}) + "\n")
    return Oracle(net, names, acc)
