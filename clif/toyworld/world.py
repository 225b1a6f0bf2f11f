"""The world: scenes of 1–2 objects on plain light backgrounds, their masks and a caption that states all.

Every attribute that identifies an object is coarse, so it survives 32 px and a VAE round trip: the class
(3 silhouettes), the body colour (6 well-separated colours) and one large two-colour mark (a top half in a
second colour, a band across the middle, or a big central spot). Objects are large (radius 21 % of the image).

Everything is drawn from a `numpy.random.Generator`, so a seed fixes every scene; rendering is pure (the same
`Obj`/`Scene` always gives the same pixels). Objects are drawn 4x supersampled and downscaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("ball", "box", "star")
COLORS = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (135, 40, 175),
    "black": (20, 20, 20),
}
# the identity mark; "solid" = none. Phrase: "a red ball with a blue top / band / spot"
PATTERNS = ("solid", "top", "band", "spot")
PATTERN_P = (0.4, 0.2, 0.2, 0.2)
SLOTS = {"left": 0.27, "right": 0.73, "center": 0.5}
RADIUS = 0.21  # object radius, fraction of the image
JITTER = 0.06  # vertical jitter, fraction of the image
SS = 4  # supersampling factor


@dataclass(frozen=True)
class Obj:
    """One object: everything that identifies it, and where it stands."""

    cls: str
    color: str
    pattern: str = "solid"
    pattern_color: str = "black"
    slot: str = "center"
    dy: float = 0.0  # vertical jitter, fraction of the image

    def phrase(self) -> str:
        """'a yellow ball with a purple band' (no position)."""
        words = f"a {self.color} {self.cls}"
        return words if self.pattern == "solid" else f"{words} with a {self.pattern_color} {self.pattern}"

    def identity(self) -> tuple[str, str, str, str]:
        """What the object is, without where it stands (the pattern colour only counts when there is a mark)."""
        return (self.cls, self.color, self.pattern, self.pattern_color if self.pattern != "solid" else "-")


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
    encoder knows the words the training templates and prompts use."""
    from clif.train.data import OBJECT_TEMPLATES

    if rng.random() < 0.5:
        return caption
    usable = [t for t in OBJECT_TEMPLATES if "small" not in t and "large" not in t]
    return usable[rng.integers(len(usable))].format(caption[2:])  # drop the caption's own leading "a "


def random_obj(rng: np.random.Generator, slot: str) -> Obj:
    """An object with every attribute drawn at random (the mark's colour differs from the body colour)."""
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    others = [c for c in names if c != color]
    return Obj(
        cls=CLASSES[rng.integers(len(CLASSES))],
        color=color,
        pattern=PATTERNS[rng.choice(len(PATTERNS), p=PATTERN_P)],
        pattern_color=others[rng.integers(len(others))],
        slot=slot,
        dy=float(rng.uniform(-JITTER, JITTER)),
    )


def random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, low-saturation colour: objects stay the most salient thing in the image."""
    base = rng.integers(185, 250)
    return tuple(int(np.clip(base + rng.integers(-15, 16), 0, 255)) for _ in range(3))


def random_scene(rng: np.random.Generator) -> Scene:
    """One or two random objects (left/right/centre) on a random background."""
    if rng.random() < 0.5:
        slot = ("left", "right", "center")[rng.integers(3)]
        objs = (random_obj(rng, slot),)
    else:
        objs = (random_obj(rng, "left"), random_obj(rng, "right"))
    return Scene(objs, random_background(rng), int(rng.integers(2**31)))


def _centre(obj: Obj, n: int) -> tuple[float, float, float]:
    return n * SLOTS[obj.slot], n * (0.5 + obj.dy), n * RADIUS


def _shape_mask(obj: Obj, size: int) -> Image.Image:
    """The object's silhouette, supersampled canvas of `size*SS` pixels (L mode, 255 = object)."""
    n = size * SS
    cx, cy, r = _centre(obj, n)
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    if obj.cls == "ball":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj.cls == "box":
        d.rectangle([cx - r * 0.88, cy - r * 0.88, cx + r * 0.88, cy + r * 0.88], fill=255)
    elif obj.cls == "star":
        pts = [
            (
                cx + (r * 1.1 if k % 2 == 0 else r * 0.5) * math.sin(k * math.pi / 5),
                cy - (r * 1.1 if k % 2 == 0 else r * 0.5) * math.cos(k * math.pi / 5) + r * 0.08,
            )
            for k in range(10)
        ]
        d.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown class {obj.cls!r}")
    return m


def _pattern(obj: Obj, size: int) -> np.ndarray:
    """Where the mark's colour shows (bool [n, n]), in the object's own frame so it moves with it."""
    n = size * SS
    cx, cy, r = _centre(obj, n)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    u, v = xx - cx, yy - cy
    if obj.pattern == "top":
        return v < 0
    if obj.pattern == "band":
        return np.abs(v) < r * 0.33
    if obj.pattern == "spot":
        return u * u + v * v < (r * 0.5) ** 2
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
        canvas = canvas * (1 - sil[..., None]) + body * sil[..., None]
        masks.append(sil)
    noise = np.random.default_rng(scene.noise_seed).normal(0, 3, (size, size, 3))
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
    imgs, caps, _ = render_scenes(seed, count, size)
    return imgs, caps


def render_scenes(seed: int, count: int, size: int = 32) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`render_batch` plus the scenes themselves (what a referee is trained on)."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((count, size, size, 3), np.uint8)
    caps, scenes = [], []
    for i in range(count):
        scene = random_scene(rng)
        imgs[i] = np.asarray(render(scene, size)[0])
        caps.append(templated(scene.caption(), rng))
        scenes.append(scene)
    return imgs, caps, scenes


def with_slot(obj: Obj, slot: str, rng: np.random.Generator | None = None) -> Obj:
    """The same object in another slot (new vertical jitter when `rng` is given)."""
    return replace(obj, slot=slot, dy=float(rng.uniform(-JITTER, JITTER)) if rng is not None else obj.dy)


__all__ = [
    "CLASSES",
    "COLORS",
    "PATTERNS",
    "Obj",
    "Scene",
    "random_scene",
    "render",
    "render_batch",
    "render_scenes",
    "with_slot",
]
