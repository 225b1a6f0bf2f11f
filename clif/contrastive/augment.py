"""CLIF's image-caption pairs: Global, Region and Mix augmentations composed on a plain background.

Preview: `python -m clif.contrastive.augment --train_data_dir D --out PREVIEW` writes the pairs, their captions
and a grid.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from clif import seeds
from clif.cli import add_balance_arg, non_negative, positive
from clif.concepts import Concept, concept_slots, open_rgb
from clif.contrastive.captions import Templates, load_templates
from clif.contrastive.regions import MIN_IMAGE_SHARE, RegionSpec, over_segment
from clif.errors import UserError
from clif.masks import DEFAULT_SEGMENTER, Segmenter, concept_mask, cut_out

KINDS = ("global", "region", "mix")


@dataclass
class Piece:
    """A cut-out (RGBA, cropped to its mask) and how captions name it."""

    image: Image.Image
    label: str  # concept name or common word
    phrase: str  # "<tok>", "<tok>'s ear", "a chef"
    concept: int | None = None  # index of the customized concept, None for common concepts
    source: Path | None = None  # the photo it was cut from


@dataclass
class Pair:
    kind: str
    caption: str
    image: Image.Image
    layout: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # (label, box) left to right
    concepts: list[int] = field(default_factory=list)
    key: tuple[str, ...] = ()  # what the caption names, template aside: equal keys are contrastive positives
    sources: list[Path] = field(default_factory=list)  # the photos its pieces were cut from


def compose(pieces: list[Piece], size: int, rng: random.Random) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Paste 1 piece centred, or 2 pieces left/right, on a plain light background; returns image and boxes."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    canvas = Image.new("RGB", (size, size), bg)
    slot_w = size // len(pieces)
    boxes = []
    for i, piece in enumerate(pieces):
        im = piece.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else piece.image
        scale = min(slot_w / im.width, size / im.height) * rng.uniform(0.7, 0.95)
        w, h = max(1, int(im.width * scale)), max(1, int(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        x = i * slot_w + rng.randint(0, slot_w - w)
        y = rng.randint(0, size - h)
        canvas.paste(im, (x, y), im)
        boxes.append((x, y, x + w, y + h))
    return canvas, boxes


class PairBuilder:
    """Builds reproducible pairs from a concept set: same seed, same held-out photos, regions, pairs and captions."""

    def __init__(
        self,
        concepts: list[Concept],
        *,
        size: int,
        segmenter: Segmenter | None,
        common: dict[str, list[Path]] | None = None,
        regions: RegionSpec | None = None,
        holdout: int = 0,
        templates: Templates | None = None,
        seed: int = 0,
        balance: str = "concepts",
    ):
        """`regions`: over-segment the masks of concepts without part names (None: only user parts);
        `holdout`: photos per concept kept out of every pair (only for concepts that keep >= 2 for training);
        `balance`: how Global and Region pairs are shared among the concepts by their photo counts
        (--concept_balance, with their repeats; piece_weights); Mix pairs draw two concepts uniformly either way."""
        self.concepts, self.size, self.segmenter, self.balance = concepts, size, segmenter, balance
        self.templates = templates or Templates()
        self.holdout = holdout
        rng = random.Random(seed)
        self.held_files: list[list[Path]] = [
            sorted(rng.sample(c.images, holdout)) if holdout and len(c.images) >= self.images_to_hold_out else []
            for c in concepts
        ]
        train = [[p for p in c.images if p not in held] for c, held in zip(concepts, self.held_files)]
        self.wholes: list[list[Piece]] = [self._wholes(i, c, ps) for i, (c, ps) in enumerate(zip(concepts, train))]
        self.held_wholes: list[list[Piece]] = [
            self._wholes(i, c, ps) for i, (c, ps) in enumerate(zip(concepts, self.held_files))
        ]
        self.region_masks: list[list[tuple[Path, list[np.ndarray]]]] = [[] for _ in concepts]  # for the preview
        self.parts: list[list[Piece]] = [
            self._parts(i, c, ps) if c.parts else self._regions(i, c, ps, regions) if regions else []
            for i, (c, ps) in enumerate(zip(concepts, train))
        ]
        self.common: list[Piece] = []
        self.add_common(common or {})

    @property
    def images_to_hold_out(self) -> int:
        """The photos a concept needs to hold `holdout` out: they, and 2 kept for training."""
        return self.holdout + 2

    def add_common(self, common: dict[str, list[Path]]) -> None:
        """Cut out common-concept images (masks from the segmenter, prompted with the word)."""
        self.common += [p for word, paths in common.items() for p in self._common(word, paths)]

    def _mask(self, image: Path, masks_dir: Path | None, prompt: str, part: str | None, size) -> np.ndarray:
        return concept_mask(image, masks_dir, prompt, self.segmenter, size, part)

    def _wholes(self, i: int, c: Concept, paths: list[Path]) -> list[Piece]:
        out = []
        for path in paths:
            im = open_rgb(path)
            mask = self._mask(path, c.masks_dir, c.class_word, None, im.size)
            out.append(Piece(cut_out(im, mask), c.name, c.token, i, path))
        return out

    def _parts(self, i: int, c: Concept, paths: list[Path]) -> list[Piece]:
        out = []
        for part in c.parts:
            for path in paths:
                im = open_rgb(path)
                mask = self._mask(path, c.masks_dir, part, part, im.size)
                out.append(Piece(cut_out(im, mask), f"{c.name}:{part}", f"{c.token}'s {part}", i, path))
        return out

    def _regions(self, i: int, c: Concept, paths: list[Path], spec: RegionSpec) -> list[Piece]:
        """Over-segmented regions of the concept's mask, each captioned with the concept's token."""
        out, self.region_masks[i] = [], []
        for path in paths:
            im = open_rgb(path)
            found = over_segment(im, self._mask(path, c.masks_dir, c.class_word, None, im.size), spec)
            if not found:
                raise UserError(
                    f"{path}: no region of its mask is large enough (>= {MIN_IMAGE_SHARE:.1%} of the photo "
                    f"and >= {spec.min_area:.0%} of the mask) for Region pairs; use a larger mask, a smaller "
                    "--min_region_area, or --region_ratio 0"
                )
            self.region_masks[i].append((path, found))
            out += [Piece(cut_out(im, r), f"{c.name}:region{k}", c.token, i, path) for k, r in enumerate(found)]
        return out

    def _common(self, word: str, paths: list[Path]) -> list[Piece]:
        out = []
        for path in paths:
            im = open_rgb(path)
            # a mask the user gave in common/<word>/masks/<stem>.png, else the segmenter's
            mask = self._mask(path, path.parent / "masks", word, None, im.size)
            out.append(Piece(cut_out(im, mask), word, f"a {word}"))
        return out

    def counts(self, n: int, ratios: dict[str, float]) -> dict[str, int]:
        """Pairs of each kind; Region needs part masks or automatic regions, Mix needs two concepts."""
        ratios = dict(ratios)
        if ratios.get("mix", 0) > 0 and len(self.concepts) < 2:
            raise UserError("Mix augmentation needs at least two concepts (or pass --mix_ratio 0)")
        if ratios.get("region", 0) > 0 and not any(self.parts):
            raise UserError("Region augmentation needs part names ('parts' in concepts.json) or automatic regions")
        total = sum(ratios.values())
        if total <= 0:
            raise UserError("the augmentation ratios add up to 0")
        counts = {k: round(n * ratios.get(k, 0) / total) for k in KINDS}
        counts["global"] += n - sum(counts.values())
        return counts

    def piece_weights(self, kind: str) -> tuple[list[Piece], list[Fraction] | None]:
        """The pieces a Global or Region pair picks its concept piece from, and their weights: each concept's
        share (`concept_slots` over its training photos and repeats) spread evenly over its photos, every piece
        weighing what its photo weighs. Global pairs (one piece a photo) follow the share exactly; a concept whose
        photos split into more regions keeps its extra Region pairs, as without balance. None when all weights
        are equal (equal photo counts and repeats): a uniform choice, the draw the builder always made."""
        photos = [len(w) for w in self.wholes]
        slots = concept_slots(photos, [c.repeats for c in self.concepts], self.balance)
        per_concept = self.wholes if kind == "global" else self.parts
        pool = [p for ps in per_concept for p in ps]
        weights = [Fraction(s, n) for s, n, ps in zip(slots, photos, per_concept) for _ in ps]
        return pool, None if len(set(weights)) <= 1 else weights

    def samples_per_concept(self, pairs: list[Pair]) -> dict[str, int]:
        """How many of `pairs` show each concept (a Mix pair counts for both of its concepts)."""
        counts = dict.fromkeys((c.name for c in self.concepts), 0)
        for pair in pairs:
            for i in pair.concepts:
                counts[self.concepts[i].name] += 1
        return counts

    def _one(self, kind: str, rng: random.Random, weighted: dict) -> Pair:
        if kind == "mix":
            a, b = rng.sample(range(len(self.concepts)), 2)
            pieces = [rng.choice(self.wholes[a]), rng.choice(self.wholes[b])]
        else:
            pool, weights = weighted[kind]
            main = rng.choice(pool) if weights is None else rng.choices(pool, weights)[0]
            pieces = [main]
            if self.common and rng.random() < 0.5:
                pieces.insert(rng.randint(0, 1), rng.choice(self.common))
        image, boxes = compose(pieces, self.size, rng)
        phrases = [p.phrase for p in pieces]
        return Pair(
            kind,
            self.templates.caption(phrases, rng),
            image,
            [(p.label, b) for p, b in zip(pieces, boxes)],
            [p.concept for p in pieces if p.concept is not None],
            tuple(phrases),
            [p.source for p in pieces],
        )

    def build(self, n: int, ratios: dict[str, float], seed: int) -> list[Pair]:
        """`n` pairs, kinds in the proportions of `ratios`, interleaved, fully determined by `seed`."""
        rng = random.Random(seed)
        kinds = [k for k, c in self.counts(n, ratios).items() for _ in range(c)]
        rng.shuffle(kinds)
        weighted = {k: self.piece_weights(k) for k in ("global", "region") if k in kinds}
        return [self._one(k, rng, weighted) for k in kinds]

    def views(self, per_concept: int, seed: int, *, held_out: bool) -> list[Pair]:
        """Single-concept views on fresh backgrounds, scales and flips for the confusion matrix: of the held-out
        photos (concepts without any are left out), or of the training photos."""
        rng = random.Random(seed)
        out = []
        for i, c in enumerate(self.concepts):
            pieces = (self.held_wholes if held_out else self.wholes)[i]
            for _ in range(per_concept if pieces else 0):
                piece = rng.choice(pieces)
                image, boxes = compose([piece], self.size, rng)
                layout = [(c.name, boxes[0])]
                out.append(Pair("view", f"a photo of {c.token}", image, layout, [i], (c.token,), [piece.source]))
        return out


def add_pair_args(p) -> None:
    """Flags of the regions, held-out photos and caption templates (train_clif.py and the preview)."""
    d = RegionSpec()
    p.add_argument("--region_segments", type=positive(int), default=d.segments, help="SLIC superpixels per mask.")
    p.add_argument(
        "--min_region_area",
        type=positive(float),
        default=d.min_area,
        help="Regions smaller than this fraction of the concept's mask (or 0.5%% of the photo) are dropped.",
    )
    p.add_argument(
        "--regions_per_image", type=positive(int), default=d.per_image, help="At most this many (largest) regions."
    )
    p.add_argument(
        "--holdout_images",
        type=non_negative(int),
        default=1,
        help="Photos per concept kept out of the pairs for the held-out confusion matrix (concepts with at "
        "least this + 2 photos).",
    )
    p.add_argument(
        "--caption_templates",
        default=None,
        help="Text file of caption templates, one per line: '{}' once (e.g. 'a photo of {}') or twice for "
        "left/right pairs ('{} on the left and {} on the right'). Default: built-in templates.",
    )


def builder_from_args(a, concepts: list[Concept], *, size: int, segmenter, regions: bool) -> PairBuilder:
    """The PairBuilder the flags of add_pair_args describe (validates the template file first)."""
    if a.min_region_area >= 1:
        raise UserError(f"--min_region_area is a fraction of the mask (< 1), got {a.min_region_area}")
    templates = load_templates(a.caption_templates) if a.caption_templates else None
    spec = RegionSpec(a.region_segments, a.min_region_area, a.regions_per_image) if regions else None
    return PairBuilder(
        concepts,
        size=size,
        segmenter=segmenter,
        regions=spec,
        holdout=a.holdout_images,
        templates=templates,
        seed=seeds.stream(a.seed, "augmentation"),
        balance=a.concept_balance,
    )


def main(argv: list[str] | None = None) -> None:
    from clif.cli import user_errors
    from clif.concepts import load_concept_set
    from clif.contrastive.common_concepts import common_images
    from clif.contrastive.regions import boundaries
    from clif.images import grid

    p = argparse.ArgumentParser(
        prog="python -m clif.contrastive.augment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--train_data_dir", required=True, help="Concept set (dataset/README.md).")
    p.add_argument("--out", required=True, help="Folder for pair-XXX.png, captions.json, grid.png and regions/.")
    p.add_argument("--num_pairs", type=positive(int), default=24, help="Pairs to build.")
    p.add_argument("--ratios", default="0.4,0.2,0.4", help="Global,Region,Mix proportions.")
    p.add_argument("--size", type=positive(int), default=224, help="Side of the composed images.")
    p.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="CLIPSeg model for concepts without masks.")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "clif"), help="Mask/common-image cache.")
    p.add_argument("--seed", type=int, default=0, help="Same seed, same pairs.")
    add_balance_arg(p)
    add_pair_args(p)
    a = p.parse_args(argv)
    with user_errors("clif.contrastive.augment"):
        concepts = load_concept_set(a.train_data_dir)
        ratios = dict(zip(KINDS, (float(x) for x in a.ratios.split(","))))
        builder = builder_from_args(
            a, concepts, size=a.size, segmenter=Segmenter(a.segmenter, Path(a.cache_dir) / "masks"), regions=True
        )
        builder.add_common(common_images(Path(a.train_data_dir), [], Path(a.cache_dir)))
        pairs = builder.build(a.num_pairs, ratios, a.seed)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, pair in enumerate(pairs):
            pair.image.save(out / f"pair-{i:03d}.png")
        (out / "captions.json").write_text(
            json.dumps(
                [
                    {
                        "file": f"pair-{i:03d}.png",
                        "kind": q.kind,
                        "caption": q.caption,
                        "layout": q.layout,
                        "sources": [str(p) for p in q.sources],
                    }
                    for i, q in enumerate(pairs)
                ],
                indent=2,
            )
        )
        grid([q.image for q in pairs], captions=[q.caption for q in pairs]).save(out / "grid.png")
        for c, regions in zip(concepts, builder.region_masks):
            for path, masks in regions:
                (out / "regions" / c.name).mkdir(parents=True, exist_ok=True)
                with Image.open(path) as im:
                    boundaries(im, masks).save(out / "regions" / c.name / f"{path.stem}.png")
        shown = ", ".join(f"{k} {v}" for k, v in builder.samples_per_concept(pairs).items())
        print(
            f"wrote {len(pairs)} pairs to {out} (regions of concepts without part names in {out / 'regions'}); "
            f"pairs per concept: {shown}"
        )


if __name__ == "__main__":
    main()
