"""The ladder's concepts: pairs of look-alikes from clearly different to near twins, their training renders (with
masks and common-concept negatives) and the prompt templates every method generates."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .world import Obj, Scene, random_background, random_obj, render

# the ladder: each rung a pair of concepts, from clearly different to near twins
RUNGS = {
    # class and colour differ (their mixtures: a red box, a blue ball)
    "distinct": {"ball_a": Obj("ball", "red"), "box_b": Obj("box", "blue")},
    # same class and body colour; the mark differs in shape and colour (mixtures: purple spot, black band)
    "lookalike": {"ball_a": Obj("ball", "yellow", "band", "purple"), "ball_b": Obj("ball", "yellow", "spot", "black")},
    # near twins: same class, colour and mark colour; only the mark's shape differs
    "twin": {"ball_a": Obj("ball", "yellow", "band", "purple"), "ball_b": Obj("ball", "yellow", "spot", "purple")},
}
SINGLE_PROMPTS = ("a photo of a {0}", "a {0}")
PAIR_PROMPTS = (
    "a photo of a {0} on the left and a {1} on the right",
    "a {0} on the left and a {1} on the right",
    "a photo of a {1} on the left and a {0} on the right",
    "a {1} on the left and a {0} on the right",
)


def render_concept(obj: Obj, rng: np.random.Generator, size: int, slot: str = "center"):
    """One render of a concept on a fresh background: image and mask."""
    o = replace(obj, slot=slot, dy=float(rng.uniform(-0.06, 0.06)))
    img, masks = render(Scene((o,), random_background(rng), int(rng.integers(2**31))), size)
    return img, masks[0]


def write_concept_set(
    root: Path, concepts: dict[str, Obj], size: int, n_train: int = 5, n_common: int = 8, seed: int = 0
) -> Path:
    """The custom concepts (n_train renders each, masks from the generator) and, as stage-1 common-concept
    negatives, `n_common` other instances of each concept's class (random colour and mark), with their masks."""
    rng = np.random.default_rng([seed, 11])
    entries = []
    for name, obj in concepts.items():
        for sub in ("images", "masks"):
            (root / sub / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            img, mask = render_concept(obj, rng, size, ("center", "left", "right")[i % 3] if i >= 3 else "center")
            img.save(root / "images" / name / f"{i:02d}.png")
            mask.save(root / "masks" / name / f"{i:02d}.png")
        entries.append(
            {
                "name": name,
                "token": f"<{name}>",
                "initializer": obj.cls,
                "class": obj.cls,
                "images": f"images/{name}",
                "masks": f"masks/{name}",
            }
        )
    idents = {c.identity() for c in concepts.values()}
    for cls in sorted({c.cls for c in concepts.values()}):
        (root / "common" / cls / "masks").mkdir(parents=True, exist_ok=True)
        k = 0
        while k < n_common:
            other = replace(random_obj(rng, "center"), cls=cls)
            if other.identity() in idents:
                continue
            img, mask = render_concept(other, rng, size)
            img.save(root / "common" / cls / f"{k:02d}.png")
            mask.save(root / "common" / cls / "masks" / f"{k:02d}.png")
            k += 1
    (root / "concepts.json").write_text(json.dumps({"concepts": entries}, indent=2) + "\n")
    return root


def prompt_set(concepts: dict[str, Obj]) -> list[str]:
    """inference.py's templates: {0} is filled with each concept, {0}/{1} with the pair (in concepts.json order)."""
    return [*SINGLE_PROMPTS, *PAIR_PROMPTS]
