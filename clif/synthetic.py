"""A small generated concept set (distinct shapes, colours, textures) for the demo and the tests.

`python -m clif.synthetic --out DIR` writes DIR/concepts.json and DIR/images/<name>/*.png (+ masks).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

# name, shape, colour, initializer/class word (single CLIP tokens)
CONCEPTS = [
    ("redball", "ellipse", (220, 40, 40), "ball"),
    ("bluebox", "rectangle", (40, 70, 220), "box"),
    ("greentri", "triangle", (40, 180, 70), "toy"),
    ("stripes", "stripes", (230, 180, 30), "rug"),
]


def draw_concept(
    shape: str, colour: tuple[int, int, int], size: int, rng: random.Random
) -> tuple[Image.Image, Image.Image]:
    """One image of a concept on a light random background, and its mask (white = concept)."""
    bg = tuple(rng.randint(170, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    s = rng.uniform(0.45, 0.7) * size
    x0, y0 = rng.uniform(0, size - s), rng.uniform(0, size - s)
    box = (x0, y0, x0 + s, y0 + s)
    jitter = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in colour)
    for target, fill in ((img, jitter), (mask, 255)):
        d = ImageDraw.Draw(target)
        if shape == "ellipse":
            d.ellipse(box, fill=fill)
        elif shape == "rectangle":
            d.rectangle(box, fill=fill)
        elif shape == "triangle":
            d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)
        else:
            d.rectangle(box, fill=fill if target is mask else (30, 30, 30))
            if target is img:
                for k in range(0, int(s), max(2, int(s / 8))):
                    d.rectangle((x0 + k, y0, x0 + k + s / 16, y0 + s), fill=jitter)
    return img, mask


def write_concept_set(
    out: str | Path, *, n_concepts: int = 2, n_images: int = 4, size: int = 64, seed: int = 0
) -> Path:
    """Write a concept set of `n_concepts` synthetic concepts; returns its folder."""
    out = Path(out)
    rng = random.Random(seed)
    entries = []
    for name, shape, colour, word in CONCEPTS[:n_concepts]:
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        (out / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            img, mask = draw_concept(shape, colour, size, rng)
            img.save(out / "images" / name / f"{i:02d}.png")
            mask.save(out / "masks" / name / f"{i:02d}.png")
        entries.append(
            {
                "name": name,
                "token": f"<{name}>",
                "initializer": word,
                "class": word,
                "images": f"images/{name}",
                "masks": f"masks/{name}",
            }
        )
    (out / "concepts.json").write_text(json.dumps({"concepts": entries}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m clif.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="Folder to write the concept set into.")
    p.add_argument("--num_concepts", type=int, default=2, choices=range(1, len(CONCEPTS) + 1))
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_concept_set(a.out, n_concepts=a.num_concepts, n_images=a.num_images, size=a.size, seed=a.seed))


if __name__ == "__main__":
    main()
