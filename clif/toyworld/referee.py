"""The referee: a small CNN that reads a toy-world image as the world's generator wrote it.

It says which slots hold an object (the layout: left / right / centre / left+right / none) and, for each slot,
the object's class, body colour, mark and mark colour. It is trained on *VAE round trips* of rendered scenes
(encode, then decode with the base's own VAE), so it sees the decoder's blur and judges generated samples
the way it judges renders. Only a toy world can have this referee: it knows the ground truth of every scene.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import CLASSES, COLORS, PATTERNS, Obj, Scene, random_background, random_scene, render

LAYOUTS = ("left", "right", "center", "left+right", "none")
SLOT_NAMES = ("left", "right", "center")
HEADS = {"cls": CLASSES, "color": tuple(COLORS), "pattern": PATTERNS, "pattern_color": tuple(COLORS)}
ATTRIBUTES = tuple(HEADS)


def layout_of(scene: Scene) -> str:
    return "+".join(o.slot for o in scene.objects) if scene.objects else "none"


def _width() -> int:
    return len(LAYOUTS) + len(SLOT_NAMES) * sum(len(v) for v in HEADS.values())


def build_net() -> torch.nn.Module:
    c = torch.nn
    return c.Sequential(
        c.Conv2d(3, 16, 3, padding=1),
        c.GELU(),
        c.Conv2d(16, 16, 3, padding=1),
        c.GELU(),
        c.MaxPool2d(2),
        c.Conv2d(16, 32, 3, padding=1),
        c.GELU(),
        c.Conv2d(32, 32, 3, padding=1),
        c.GELU(),
        c.AdaptiveAvgPool2d(8),  # keeps where things are: 8x8 cells
        c.Flatten(),
        c.Linear(32 * 64, 256),
        c.GELU(),
        c.Linear(256, _width()),
    )


def split_logits(out: torch.Tensor) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Network output -> layout logits [B, 5] and {slot: {attribute: logits}}."""
    layout, k = out[:, : len(LAYOUTS)], len(LAYOUTS)
    slots = {}
    for s in SLOT_NAMES:
        slots[s] = {}
        for name, values in HEADS.items():
            slots[s][name] = out[:, k : k + len(values)]
            k += len(values)
    return layout, slots


def labels(scenes: list[Scene]) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Targets; -100 (ignored) for absent slots, and for the mark colour of a solid object."""
    lay = torch.tensor([LAYOUTS.index(layout_of(s)) for s in scenes])
    slots = {s: {n: torch.full((len(scenes),), -100) for n in HEADS} for s in SLOT_NAMES}
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            for n, values in HEADS.items():
                if n == "pattern_color" and o.pattern == "solid":
                    continue
                slots[o.slot][n][i] = values.index(getattr(o, n))
    return lay, slots


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, 32, 32] in [-1, 1] (resized to the world's 32 px when larger)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.interpolate(x, size=(32, 32), mode="area") if x.shape[-1] != 32 else x


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Encode (latent mean) and decode with the base's VAE: what a perfect UNet could at best produce."""
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s : s + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def render_training_scenes(n: int, size: int, seed: int, empty: float = 0.04) -> tuple[np.ndarray, list[Scene]]:
    """`n` random world scenes (a few empty ones), rendered at `size` px."""
    rng = np.random.default_rng(seed)
    scenes, imgs = [], np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        sc = random_scene(rng) if rng.random() >= empty else Scene((), random_background(rng), int(rng.integers(2**31)))
        imgs[i] = np.asarray(render(sc, size)[0])
        scenes.append(sc)
    return imgs, scenes


@dataclass
class Read:
    """What the referee sees in one image."""

    layout: str
    slots: dict[str, Obj | None]

    def objects(self) -> list[Obj]:
        return [o for o in self.slots.values() if o is not None]


class Referee:
    def __init__(self, net: torch.nn.Module, meta: dict):
        self.net, self.meta = net.eval(), meta

    @torch.no_grad()
    def read(self, images: np.ndarray, batch: int = 256) -> list[Read]:
        """uint8 images [B, H, W, 3] -> one `Read` per image."""
        out = []
        for s in range(0, len(images), batch):
            lay, slots = split_logits(self.net(to_input(images[s : s + batch])))
            lay = lay.argmax(1).tolist()
            picks = {sl: {n: v.argmax(1).tolist() for n, v in heads.items()} for sl, heads in slots.items()}
            for i, li in enumerate(lay):
                layout = LAYOUTS[li]
                present = [] if layout == "none" else layout.split("+")
                read = {}
                for sl in SLOT_NAMES:
                    if sl not in present:
                        read[sl] = None
                        continue
                    a = {n: HEADS[n][picks[sl][n][i]] for n in HEADS}
                    read[sl] = Obj(a["cls"], a["color"], a["pattern"], a["pattern_color"], slot=sl)
                out.append(Read(layout, read))
        return out

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "referee.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / "referee.safetensors")
        (folder / "referee.json").write_text(json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Referee:
        from safetensors.torch import load_file

        net = build_net()
        net.load_state_dict(load_file(str(folder / "referee.safetensors")))
        return cls(net, json.loads((folder / "referee.json").read_text()))


def score_reads(reads: list[Read], scenes: list[Scene]) -> dict[str, float]:
    """Accuracy of reads against the scenes' truth: layout, object count, and each attribute per true object
    (an object whose slot is read as empty counts as wrong for every attribute)."""
    hits = {"layout": [], "count": []} | {a: [] for a in ATTRIBUTES} | {"identity": []}
    for r, sc in zip(reads, scenes):
        hits["layout"].append(r.layout == layout_of(sc))
        hits["count"].append(len(r.objects()) == len(sc.objects))
        for o in sc.objects:
            got = r.slots.get(o.slot)
            for a in ATTRIBUTES:
                if a == "pattern_color" and o.pattern == "solid":
                    continue
                hits[a].append(got is not None and getattr(got, a) == getattr(o, a))
            hits["identity"].append(got is not None and got.identity() == o.identity())
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


def train_referee(
    vae, size: int, out: Path | None = None, *, n_train: int = 16000, steps: int = 2500, seed: int = 0
) -> Referee:
    """Train on VAE round trips of `n_train` rendered scenes; held-out accuracy on 2,000 fresh round trips is
    stored in `meta`. Loads the saved referee from `out` when it is already there."""
    if out is not None and (out / "referee.safetensors").is_file():
        return Referee.load(out)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    imgs, scenes = render_training_scenes(n_train, size, seed)
    x = to_input(vae_round_trip(vae, imgs))
    lay, slots = labels(scenes)
    net = build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(1, steps), pct_start=0.1)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(128, len(x)),), generator=g)
        xb = x[idx]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # one-pixel jitter: samples are not pixel-exact
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        pl, ps = split_logits(net(xb))
        loss = F.cross_entropy(pl, lay[idx])
        for s in SLOT_NAMES:
            for n in HEADS:
                t = slots[s][n][idx]
                if (t >= 0).any():
                    loss = loss + F.cross_entropy(ps[s][n], t, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    h_imgs, h_scenes = render_training_scenes(2000 if n_train >= 2000 else max(16, n_train // 4), size, seed + 1)
    ref = Referee(net, {"size": size, "n_train": n_train, "steps": steps, "seed": seed})
    ref.meta["heldout_round_trip_accuracy"] = score_reads(ref.read(vae_round_trip(vae, h_imgs)), h_scenes)
    ref.meta["heldout_render_accuracy"] = score_reads(ref.read(h_imgs), h_scenes)
    if out is not None:
        ref.save(out)
    return ref
