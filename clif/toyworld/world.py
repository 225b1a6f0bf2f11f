"""The world: scenes of 1–2 patterned objects on plain backgrounds, their masks and a caption that states all.

Everything is drawn from a `numpy.random.Generator`, so a seed fixes every scene; rendering is pure
(the same `Obj`/`Scene` always gives the same pixels). Objects are drawn 4x supersampled and downscaled,
so patterns stay legible at 32–64 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ball", "box", "cup", "star", "ring", "heart")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
}
PATTERNS = ("solid", "stripes", "dots", "checks")
SIZES = ("small", "large")
MARKS = ("none", "spot")
SLOTS = {"left": 0.27, "right": 0.73, "center": 0.5}
SS = 4  # supersampling factor


@dataclass(frozen=True)
class Obj:
    """One object: everything that identifies it, and where it stands."""

    cls: str
    color: str
    pattern: str = "solid"
    pattern_color: str = "white"
    size: str = "large"
    mark: str = "none"
    mark_color: str = "black"
    slot: str = "center"
    dy: float = 0.0  # vertical jitter, fraction of the image

    def phrase(self) -> str:
        """'a small yellow ball with purple dots and a black spot' (no position)."""
        words = ["a"] + (["small"] if self.size == "small" else []) + [self.color, self.cls]
        extras = []
        if self.pattern != "solid":
            extras.append(f"{self.pattern_color} {self.pattern}")
        if self.mark == "spot":
            extras.append(f"a {self.mark_color} spot")
        return " ".join(words) + ("" if not extras else " with " + " and ".join(extras))


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = (230, 230, 230)
    noise_seed: int = 0

    def caption(self) -> str:
        if len(self.objects) == 1 and self.objects[0].slot == "center":
            return self.objects[0].phrase()
        return " and ".join(f"{o.phrase()} on the {o.slot}" for o in self.objects)


def templated(caption: str, rng: np.random.Generator) -> str:
    """Half the captions are wrapped in a stage-2 object template ("a photo of the {}"), so the world's text
    encoder knows the words the training templates and prompts use; sizes stay the caption's own."""
    from clif.train.data import OBJECT_TEMPLATES

    if rng.random() < 0.5:
        return caption
    usable = [t for t in OBJECT_TEMPLATES if "small" not in t and "large" not in t]
    return usable[rng.integers(len(usable))].format(caption[2:])  # drop the caption's own leading "a "


def random_obj(rng: np.random.Generator, slot: str) -> Obj:
    """An object with every attribute drawn at random (pattern colour differs from body colour)."""
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    others = [c for c in names if c != color]
    return Obj(
        cls=CLASSES[rng.integers(len(CLASSES))],
        color=color,
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        pattern_color=others[rng.integers(len(others))],
        size=SIZES[rng.integers(len(SIZES))],
        mark=MARKS[rng.integers(len(MARKS))],
        mark_color=others[rng.integers(len(others))],
        slot=slot,
        dy=float(rng.uniform(-0.08, 0.08)),
    )


def random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, low-saturation colour: objects stay the most salient thing in the image."""
    base = rng.integers(170, 250)
    return tuple(int(np.clip(base + rng.integers(-25, 26), 0, 255)) for _ in range(3))


def random_scene(rng: np.random.Generator) -> Scene:
    """One or two random objects (left/right/centre) on a random background."""
    if rng.random() < 0.5:
        slot = ("left", "right", "center")[rng.integers(3)]
        objs = (random_obj(rng, slot),)
    else:
        objs = (random_obj(rng, "left"), random_obj(rng, "right"))
    return Scene(objs, random_background(rng), int(rng.integers(2**31)))


def _shape_mask(obj: Obj, size: int) -> Image.Image:
    """The object's silhouette, supersampled canvas of `size*SS` pixels (L mode, 255 = object)."""
    n = size * SS
    r = n * (0.2 if obj.size == "large" else 0.14)
    cx, cy = n * SLOTS[obj.slot], n * (0.5 + obj.dy)
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    if obj.cls == "ball":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj.cls == "box":
        d.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=255)
    elif obj.cls == "cup":
        d.polygon(
            [(cx - r, cy - r * 0.8), (cx + r * 0.7, cy - r * 0.8), (cx + r * 0.5, cy + r), (cx - r * 0.8, cy + r)],
            fill=255,
        )
        d.ellipse([cx + r * 0.35, cy - r * 0.5, cx + r * 1.15, cy + r * 0.4], outline=255, width=max(1, int(r * 0.22)))
    elif obj.cls == "star":
        pts = [
            (
                cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5),
            )
            for k in range(10)
        ]
        d.polygon(pts, fill=255)
    elif obj.cls == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
    elif obj.cls == "heart":
        d.ellipse([cx - r, cy - r * 0.8, cx, cy + r * 0.1], fill=255)
        d.ellipse([cx, cy - r * 0.8, cx + r, cy + r * 0.1], fill=255)
        d.polygon([(cx - r * 0.97, cy - r * 0.2), (cx + r * 0.97, cy - r * 0.2), (cx, cy + r)], fill=255)
    else:
        raise ValueError(f"unknown class {obj.cls!r}")
    return m


def _pattern(obj: Obj, size: int) -> np.ndarray:
    """Where the pattern colour shows (bool [n, n]), in the object's own frame so it moves with it."""
    n = size * SS
    period = n / 8.0  # 4 px at 32 px
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = n * SLOTS[obj.slot], n * (0.5 + obj.dy)
    u, v = xx - cx, yy - cy
    if obj.pattern == "stripes":
        return (np.floor(v / (period * 0.5)) % 2) == 0
    if obj.pattern == "checks":
        return ((np.floor(u / (period * 0.5)) + np.floor(v / (period * 0.5))) % 2) == 0
    if obj.pattern == "dots":
        fu, fv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return fu * fu + fv * fv < 0.09
    return np.zeros((n, n), bool)


def render(scene: Scene, size: int = 32) -> tuple[Image.Image, list[Image.Image]]:
    """RGB image of `scene` at `size` px and one L-mode mask (255 = visible object) per object."""
    n = size * SS
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = scene.background
    masks = []
    for obj in scene.objects:
        sil = np.asarray(_shape_mask(obj, size), np.float32) / 255.0
        body = np.empty((n, n, 3), np.float32)
        body[:] = COLORS[obj.color]
        body[_pattern(obj, size)] = COLORS[obj.pattern_color]
        if obj.mark == "spot":
            r = n * (0.2 if obj.size == "large" else 0.14)
            cx, cy = n * SLOTS[obj.slot] - r * 0.35, n * (0.5 + obj.dy) - r * 0.35
            yy, xx = np.mgrid[0:n, 0:n]
            body[(xx - cx) ** 2 + (yy - cy) ** 2 < (r * 0.3) ** 2] = COLORS[obj.mark_color]
        canvas = canvas * (1 - sil[..., None]) + body * sil[..., None]
        masks.append(sil)
    noise = np.random.default_rng(scene.noise_seed).normal(0, 4, (size, size, 3))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((size, size), Image.BOX)
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
    out_masks = []
    covered = np.zeros((n, n), np.float32)
    for sil in reversed(masks):  # later objects are drawn on top
        vis = sil * (1 - covered)
        covered = np.maximum(covered, sil)
        m = Image.fromarray((vis * 255).astype(np.uint8)).resize((size, size), Image.BOX)
        out_masks.append(m.point(lambda p: 255 if p >= 128 else 0))
    return img, out_masks[::-1]


def render_batch(seed: int, count: int, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """`count` random scenes from `seed`: uint8 images [count, size, size, 3] and their captions."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((count, size, size, 3), np.uint8)
    caps = []
    for i in range(count):
        scene = random_scene(rng)
        imgs[i] = np.asarray(render(scene, size)[0])
        caps.append(templated(scene.caption(), rng))
    return imgs, caps


def with_slot(obj: Obj, slot: str, rng: np.random.Generator | None = None) -> Obj:
    """The same object in another slot (new vertical jitter when `rng` is given)."""
    return replace(obj, slot=slot, dy=float(rng.uniform(-0.08, 0.08)) if rng is not None else obj.dy)


__all__ = ["CLASSES", "COLORS", "Obj", "Scene", "random_scene", "render", "render_batch", "with_slot"]
