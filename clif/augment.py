"""CLIF's image-caption pairs: Global, Region and Mix augmentations composed on a plain background.

Preview: `python -m clif.augment --train_data_dir D --out PREVIEW` writes the pairs, their captions and a grid.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .cli import UserError
from .concepts import Concept, list_images, open_rgb
from .masks import DEFAULT_SEGMENTER, Segmenter, check_usable, load_mask, user_mask

KINDS = ("global", "region", "mix")


@dataclass
class Piece:
    """A cut-out (RGBA, cropped to its mask) and how captions name it."""

    image: Image.Image
    label: str  # concept name or common word
    phrase: str  # "<tok>", "<tok>'s ear", "a chef"
    concept: int | None = None  # index of the customized concept, None for common concepts


@dataclass
class Pair:
    kind: str
    caption: str
    image: Image.Image
    layout: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # (label, box) left to right
    concepts: list[int] = field(default_factory=list)


def cut_out(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The masked pixels of `image` as RGBA, cropped to the mask's bounding box (alpha = mask)."""
    rgba = image.convert("RGB").copy()
    rgba.putalpha(Image.fromarray(mask.astype(np.uint8) * 255))
    ys, xs = np.nonzero(mask)
    return rgba.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


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
    """Builds reproducible pairs from a concept set: same seed, same pairs."""

    def __init__(
        self,
        concepts: list[Concept],
        *,
        size: int,
        segmenter: Segmenter | None,
        common: dict[str, list[Path]] | None = None,
    ):
        self.concepts, self.size, self.segmenter = concepts, size, segmenter
        self.wholes: list[list[Piece]] = [self._wholes(i, c) for i, c in enumerate(concepts)]
        self.parts: list[list[Piece]] = [self._parts(i, c) for i, c in enumerate(concepts)]
        self.common: list[Piece] = []
        self.add_common(common or {})

    def add_common(self, common: dict[str, list[Path]]) -> None:
        """Cut out common-concept images (masks from the segmenter, prompted with the word)."""
        self.common += [p for word, paths in common.items() for p in self._common(word, paths)]

    def _mask(self, image: Path, masks_dir: Path | None, prompt: str, part: str | None, size) -> np.ndarray:
        given = user_mask(masks_dir, image, part)
        if given is not None:
            return check_usable(load_mask(given, size), str(given))
        if self.segmenter is None:
            raise UserError(f"no mask for {image}{' part ' + part if part else ''} and no segmenter")
        return check_usable(self.segmenter.mask(image, prompt), f"{image} (segmented as {prompt!r})")

    def _wholes(self, i: int, c: Concept) -> list[Piece]:
        out = []
        for path in c.images:
            im = open_rgb(path)
            mask = self._mask(path, c.masks_dir, c.class_word, None, im.size)
            out.append(Piece(cut_out(im, mask), c.name, c.token, i))
        return out

    def _parts(self, i: int, c: Concept) -> list[Piece]:
        out = []
        for part in c.parts:
            for path in c.images:
                im = open_rgb(path)
                mask = self._mask(path, c.masks_dir, part, part, im.size)
                out.append(Piece(cut_out(im, mask), f"{c.name}:{part}", f"{c.token}'s {part}", i))
        return out

    def _common(self, word: str, paths: list[Path]) -> list[Piece]:
        out = []
        for path in paths:
            im = open_rgb(path)
            out.append(Piece(cut_out(im, self._mask(path, None, word, None, im.size)), word, f"a {word}"))
        return out

    def counts(self, n: int, ratios: dict[str, float]) -> dict[str, int]:
        """Pairs of each kind; Region needs part names, Mix needs two concepts."""
        ratios = dict(ratios)
        if ratios.get("mix", 0) > 0 and len(self.concepts) < 2:
            raise UserError("Mix augmentation needs at least two concepts (or pass --mix_ratio 0)")
        if ratios.get("region", 0) > 0 and not any(self.parts):
            raise UserError("Region augmentation needs part names ('parts' in concepts.json) or --region_ratio 0")
        total = sum(ratios.values())
        if total <= 0:
            raise UserError("the augmentation ratios add up to 0")
        counts = {k: round(n * ratios.get(k, 0) / total) for k in KINDS}
        counts["global"] += n - sum(counts.values())
        return counts

    def _one(self, kind: str, rng: random.Random) -> Pair:
        if kind == "mix":
            a, b = rng.sample(range(len(self.concepts)), 2)
            pieces = [rng.choice(self.wholes[a]), rng.choice(self.wholes[b])]
        else:
            pool = [p for ps in (self.wholes if kind == "global" else self.parts) for p in ps]
            main = rng.choice(pool)
            pieces = [main]
            if self.common and rng.random() < 0.5:
                pieces.insert(rng.randint(0, 1), rng.choice(self.common))
        image, boxes = compose(pieces, self.size, rng)
        if len(pieces) == 1:
            caption = f"a photo of {pieces[0].phrase}"
        else:
            caption = f"a photo of {pieces[0].phrase} on the left and {pieces[1].phrase} on the right"
        return Pair(
            kind,
            caption,
            image,
            [(p.label, b) for p, b in zip(pieces, boxes)],
            [p.concept for p in pieces if p.concept is not None],
        )

    def build(self, n: int, ratios: dict[str, float], seed: int) -> list[Pair]:
        """`n` pairs, kinds in the proportions of `ratios`, interleaved, fully determined by `seed`."""
        rng = random.Random(seed)
        kinds = [k for k, c in self.counts(n, ratios).items() for _ in range(c)]
        rng.shuffle(kinds)
        return [self._one(k, rng) for k in kinds]

    def views(self, per_concept: int, seed: int) -> list[Pair]:
        """Held-out single-concept views (fresh backgrounds, scales, flips) for the confusion matrix."""
        rng = random.Random(seed)
        out = []
        for i, c in enumerate(self.concepts):
            for _ in range(per_concept):
                image, boxes = compose([rng.choice(self.wholes[i])], self.size, rng)
                out.append(Pair("view", f"a photo of {c.token}", image, [(c.name, boxes[0])], [i]))
        return out


def common_images(root: Path, words: list[str], cache_dir: Path) -> dict[str, list[Path]]:
    """common/<word>/ images of the concept set, else those generated earlier into cache_dir/common/<word>/."""
    found = {}
    for word in words or sorted(p.name for p in (root / "common").glob("*") if p.is_dir()):
        for d in (root / "common" / word, cache_dir / "common" / word):
            if d.is_dir() and list_images(d):
                found[word] = list_images(d)
                break
    return found


def main(argv: list[str] | None = None) -> None:
    from .cli import user_errors
    from .concepts import load_concept_set
    from .images import grid

    p = argparse.ArgumentParser(
        prog="python -m clif.augment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train_data_dir", required=True, help="Concept set (dataset/README.md).")
    p.add_argument("--out", required=True, help="Folder for pair-XXX.png, captions.json and grid.png.")
    p.add_argument("--num_pairs", type=int, default=24, help="Pairs to build.")
    p.add_argument("--ratios", default="0.4,0.2,0.4", help="Global,Region,Mix proportions.")
    p.add_argument("--size", type=int, default=224, help="Side of the composed images.")
    p.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="CLIPSeg model for concepts without masks.")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "clif"), help="Mask/common-image cache.")
    p.add_argument("--seed", type=int, default=0, help="Same seed, same pairs.")
    a = p.parse_args(argv)
    with user_errors("clif.augment"):
        concepts = load_concept_set(a.train_data_dir)
        ratios = dict(zip(KINDS, (float(x) for x in a.ratios.split(","))))
        builder = PairBuilder(
            concepts,
            size=a.size,
            segmenter=Segmenter(a.segmenter, Path(a.cache_dir) / "masks"),
            common=common_images(Path(a.train_data_dir), [], Path(a.cache_dir)),
        )
        pairs = builder.build(a.num_pairs, ratios, a.seed)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, pair in enumerate(pairs):
            pair.image.save(out / f"pair-{i:03d}.png")
        (out / "captions.json").write_text(
            json.dumps(
                [
                    {"file": f"pair-{i:03d}.png", "kind": q.kind, "caption": q.caption, "layout": q.layout}
                    for i, q in enumerate(pairs)
                ],
                indent=2,
            )
        )
        grid([q.image for q in pairs], captions=[q.caption for q in pairs]).save(out / "grid.png")
        print(f"wrote {len(pairs)} pairs to {out}")


if __name__ == "__main__":
    main()
