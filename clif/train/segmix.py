"""Seg-Mix in stage 3 (MuDI, Jang et al. 2024): two concepts' segmented training images pasted side by side, a
caption naming both and their sides, and the denoising loss masked to the pasted subjects.

What MuDI does (agwmon/MuDI, train_segmix_lora_sdxl.py) and what is kept here:
- each subject is cut to its mask's bounding box and scaled by a factor drawn in [0.75, 1] of the largest that fits
  its half of the canvas less a margin (1/32 of the side); the left one lies 1 px to 1/4 of the side from the left
  edge, the right one as far from the right edge, each at its own random height, on white; where they overlap, a
  random one of the two lies on top;
- the loss mask is the union of the two pasted masks, bilinearly resized to the latent grid; the loss is the mean
  over every latent element of squared error x weight (not divided by the mask's area), the weight being 1 on the
  subjects and --segmix_background_weight elsewhere (MuDI's soft_alpha: its code's dataset default 0 masks the loss
  to the subjects; its command-line default and README use 1, no mask); single images keep a weight of ones, so
  their loss is the usual one;
- MuDI's caption names the two concepts in a fixed order ("a photo of a {} and a {}, simple background"); ours says
  which one is on which side.
Unlike MuDI, which builds and encodes each collage on the fly, the collages are a fixed pool per run
(--segmix_collages per training image, drawn from --seed), so that --cache_latents encodes them once like the
images. Whether a sample of the stream is a collage, and which of its image's collages, comes from a per-epoch
generator: micro-batch k stays a pure function of (seed, k), for resume and sharding.

Preview: `python -m clif.train.segmix --train_data_dir D --out PREVIEW` writes a grid of collages with their masks.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clif import seeds
from clif.concepts import Concept, open_rgb
from clif.errors import UserError
from clif.masks import Segmenter, concept_mask, cut_out, user_mask
from clif.tokens import expand_prompt
from clif.train.data import ConceptImages, LatentCache, Sample, encode_posterior, stream_items

CAPTION = "a photo of a {} on the left and a {} on the right"
SCALE = (0.75, 1.0)  # of the largest size that fits the subject's half
MARGIN = 1 / 32  # of the side, kept free when a subject is fitted to its half (MuDI: 32 px of 1024)
MAX_INSET = 1 / 4  # of the side: the farthest a subject lies from its edge (MuDI: 256 px of 1024)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [B, 1, R, R] pixel mask resized to the latent grid `size` (bilinear, as MuDI: values in [0, 1])."""
    return F.interpolate(mask.float(), size=tuple(size), mode="bilinear", align_corners=False)


def caption(left: Concept, right: Concept, concepts: list[Concept]) -> str:
    """The collage's caption, the concept tokens written as all their vectors (as stage 3's captions are)."""
    return expand_prompt(CAPTION.format(left.token, right.token), concepts)


def paste_pair(
    left: Image.Image, right: Image.Image, size: int, rng: random.Random, mirror: bool = False
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Two cut-outs (RGBA, alpha = mask) pasted at the left and right of a white size x size canvas, scaled and
    placed as MuDI does; with `mirror`, each is mirrored with probability 1/2. Returns the uint8 image [R, R, 3],
    the bool mask [R, R] of the pasted pixels (their union) and the two boxes (x, y, w, h), left first."""
    canvas = np.full((size, size, 3), 255, np.uint8)
    union = np.zeros((size, size), bool)
    margin, inset_max = max(1, round(size * MARGIN)), max(1, round(size * MAX_INSET))
    placed = []
    for side, piece in enumerate((left, right)):
        if rng.random() < 0.5 and mirror:
            piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        fit = min((size / 2 - margin) / piece.width, (size - margin) / piece.height)
        scale = fit * rng.uniform(*SCALE)
        w, h = max(1, int(piece.width * scale)), max(1, int(piece.height * scale))
        rgba = np.asarray(piece.resize((w, h), Image.Resampling.BICUBIC))
        inset = rng.randint(1, inset_max)
        x = inset if side == 0 else size - inset - w
        y = rng.randint(0, size - h)
        placed.append((x, y, rgba[..., :3], rgba[..., 3] >= 128))
    boxes = [(x, y, mask.shape[1], mask.shape[0]) for x, y, _, mask in placed]
    if rng.random() < 0.5:  # which one lies on top where they overlap
        placed.reverse()
    for x, y, rgb, mask in placed:
        h, w = mask.shape
        canvas[y : y + h, x : x + w][mask] = rgb[mask]
        union[y : y + h, x : x + w] |= mask
    return canvas, union, boxes


class SegMix:
    """The --segmix_prob flags of a run: checked with the concept set (before the model loads), then the pool of
    collages built over the stage's sample stream. With --segmix_prob 0 it changes nothing."""

    def __init__(self, args):
        self.prob, self.per_image = args.segmix_prob, args.segmix_collages
        self.background = args.segmix_background_weight
        self.size, self.mirror, self.seed = args.resolution, args.random_flip, args.seed
        self.property = args.learnable_property
        self.segmenter = Segmenter(args.segmenter, Path(args.cache_dir) / "masks")
        self.cut: list[list[Image.Image]] = []  # per concept, per image: the cut-out subject

    @property
    def on(self) -> bool:
        return self.prob > 0

    def check(self, concepts: list[Concept]) -> None:
        """Two concepts or more, object captions, and a usable mask for every image (the concept set's, else the
        segmenter's); the cut-outs are kept."""
        if not self.on:
            return
        if len(concepts) < 2:
            raise UserError(f"--segmix_prob {self.prob} needs at least two concepts (the set has {len(concepts)})")
        if self.property != "object":
            raise UserError(f"--segmix_prob pastes objects; it does not apply to --learnable_property {self.property}")
        self.cut = [[self._cut_out(c, path) for path in c.images] for c in concepts]

    def _cut_out(self, c: Concept, path: Path) -> Image.Image:
        im = open_rgb(path)
        try:
            mask = concept_mask(path, c.masks_dir, c.class_word, self.segmenter, im.size)
        except UserError as err:
            if user_mask(c.masks_dir, path) is not None:
                raise
            raise UserError(
                f"--segmix_prob needs a mask of every image: {path} has none (masks/{c.name}/{path.stem}.png) "
                f"and segmenting it failed: {err}"
            ) from None
        return cut_out(im, mask)

    def wrap(
        self, data: ConceptImages, cache: LatentCache | None, concepts: list[Concept], vae, device
    ) -> tuple[ConceptImages | SegMixStream, LatentCache | MixedCache | None]:
        """The stage's sample stream and latent cache, with collages in place of a share `prob` of the samples."""
        if not self.on:
            return data, cache
        seed = seeds.stream(self.seed, "segmix")
        pool = CollagePool(self.cut, concepts, self.size, self.per_image, seed, self.mirror)
        stream = SegMixStream(data, pool, self.prob, seeds.stream(self.seed, "segmix_order"), self.background)
        return stream, None if cache is None else MixedCache(cache, pool, vae, device)

    def stats(self, data, n: int) -> dict:
        """run_stats.json's "segmix" entry (none when off)."""
        return {"segmix": data.stats(n)} if isinstance(data, SegMixStream) else {}


class CollagePool:
    """`per_image` collages of every training image (in ConceptImages' order) with a partner from another concept:
    collage v of image i is i * per_image + v, a pure function of (seed, that index); the image lies on the left in
    the even ones, on the right in the odd ones."""

    def __init__(
        self,
        cut: list[list[Image.Image]],
        concepts: list[Concept],
        size: int,
        per_image: int,
        seed: int,
        mirror: bool = False,
    ):
        self.per_image, self.concepts = per_image, concepts
        images, masks, self.sides, self.captions = [], [], [], []
        owners = [(ci, k) for ci, pieces in enumerate(cut) for k in range(len(pieces))]
        for index in range(len(owners) * per_image):
            ci, k = owners[index // per_image]
            rng = random.Random(seeds.element(seed, index))
            other = rng.choice([o for o in range(len(cut)) if o != ci])
            partner = rng.randrange(len(cut[other]))
            # the image's concept alternates sides (pool index even: left), so that both sides have their share
            (li, lp), (ri, rp) = ((ci, k), (other, partner)) if index % 2 == 0 else ((other, partner), (ci, k))
            im, mask, _ = paste_pair(cut[li][lp], cut[ri][rp], size, rng, mirror)
            images.append(torch.from_numpy(im).permute(2, 0, 1))
            masks.append(torch.from_numpy(mask)[None])
            self.sides.append((li, ri))
            self.captions.append(caption(concepts[li], concepts[ri], concepts))
        self.pixels = torch.stack(images).float().div(127.5).sub(1.0)  # [M, 3, R, R] in [-1, 1], as preprocess()
        self.masks = torch.stack(masks)  # [M, 1, R, R] bool
        self.time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.sides)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i].add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy())


class SegMixStream:
    """A ConceptImages stream in which each sample is, with probability `prob`, one of its image's collages; a
    collage's loss weighs its pasted pixels 1 and the rest `background` (MuDI's soft_alpha: 0 = only the subjects
    count, 1 = no mask)."""

    def __init__(self, data: ConceptImages, pool: CollagePool, prob: float, seed: int, background: float = 0.0):
        self.data, self.pool, self.prob, self.seed, self.background = data, pool, prob, seed, background
        self._epochs: dict[int, torch.Tensor] = {}

    @property
    def epoch_length(self) -> int:
        return self.data.epoch_length

    def _epoch(self, e: int) -> torch.Tensor:
        """Epoch e: the collage of each of its items in the pool, -1 for the items that stay single images."""
        if e not in self._epochs:
            g = torch.Generator().manual_seed(seeds.element(self.seed, e))
            n = self.epoch_length
            mixed = torch.rand(n, generator=g) < self.prob
            variant = torch.randint(self.pool.per_image, (n,), generator=g)
            image = self.data._epoch(e)[0]
            self._epochs = {e: torch.where(mixed, image * self.pool.per_image + variant, -1)}
        return self._epochs[e]

    def micro_batch(
        self, k: int, global_batch: int, rank: int = 0, local_batch: int | None = None, with_pixels: bool = True
    ) -> Sample:
        s = self.data.micro_batch(k, global_batch, rank, local_batch, with_pixels)
        size = self.epoch_length
        collage = torch.tensor(
            [int(self._epoch(j // size)[j % size]) for j in stream_items(k, global_batch, rank, local_batch)]
        )
        hit = collage >= 0
        mask = torch.ones(len(collage), *self.pool.masks.shape[1:])
        if not hit.any():
            return replace(s, collage=collage, loss_mask=mask)
        chosen = collage[hit]
        mask[hit] = self.pool.masks[chosen].float() * (1 - self.background) + self.background
        time_ids = s.time_ids.clone()
        time_ids[hit] = self.pool.time_ids
        captions = [self.pool.captions[c] if c >= 0 else cap for c, cap in zip(collage.tolist(), s.captions)]
        pixels = s.pixels
        if pixels is not None:
            pixels = pixels.clone()
            pixels[hit] = self.pool.pixels[chosen]
        flip = s.flip & ~hit  # a collage is never mirrored as a whole: its sides would swap
        return Sample(pixels, s.image_index, flip, captions, time_ids, collage=collage, loss_mask=mask)

    def samples_per_concept(self, n: int) -> dict[str, int]:
        """The concept each sample was drawn for (a collage adds a partner: see stats)."""
        return self.data.samples_per_concept(n)

    def stats(self, n: int) -> dict:
        """What the first `n` samples held: how many collages, and of which concepts on which side."""
        size, counts = self.epoch_length, torch.zeros(len(self.pool), dtype=torch.long)
        for e in range((n + size - 1) // size):
            chosen = self._epoch(e)[: n - e * size]
            counts += torch.bincount(chosen[chosen >= 0], minlength=len(self.pool))
        by_sides: dict[tuple[int, int], int] = {}
        for (left, right), c in zip(self.pool.sides, counts.tolist()):
            by_sides[(left, right)] = by_sides.get((left, right), 0) + c
        names = [c.name for c in self.pool.concepts]
        return {
            "prob": self.prob,
            "background_weight": self.background,
            "collages_per_image": self.pool.per_image,
            "pool": len(self.pool),
            "samples": n,
            "collage_samples": int(counts.sum()),
            "caption": CAPTION,
            "sides": [{"left": names[a], "right": names[b], "samples": c} for (a, b), c in sorted(by_sides.items())],
        }


class MixedCache:
    """The images' latent cache plus the collages' posteriors (encoded once, never mirrored)."""

    def __init__(self, base: LatentCache, pool: CollagePool, vae, device, batch_size: int = 8):
        self.base = base
        self.mean, self.std = encode_posterior(vae, pool.pixels, device, vae.dtype, batch_size)

    def posterior(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.base.posterior(sample)
        collage = sample.collage.to(mean.device)
        hit = collage >= 0
        if hit.any():
            mean, std = mean.clone(), std.clone()
            mean[hit], std[hit] = self.mean[collage[hit]], self.std[collage[hit]]
        return mean, std


def preview(argv: list[str] | None = None) -> None:
    """Write collages of a concept set beside their loss masks (grid.png), and their captions (captions.json)."""
    from clif.cli import user_errors
    from clif.concepts import load_concept_set
    from clif.images import grid
    from clif.masks import DEFAULT_SEGMENTER

    p = argparse.ArgumentParser(prog="python -m clif.train.segmix", description=preview.__doc__)
    p.add_argument("--train_data_dir", required=True, help="Concept set (dataset/README.md).")
    p.add_argument("--out", required=True, help="Folder for grid.png and captions.json.")
    p.add_argument("--resolution", type=int, default=256, help="Side of the collages.")
    p.add_argument("--num", type=int, default=8, help="Collages to show.")
    p.add_argument("--seed", type=int, default=0, help="Same seed, same collages (the --seed of train_lora.py).")
    p.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="CLIPSeg model for images without masks.")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "clif"), help="Mask cache.")
    a = p.parse_args(argv)
    with user_errors("clif.train.segmix"):
        concepts = load_concept_set(a.train_data_dir)
        flags = {
            "segmix_prob": 1.0,
            "segmix_collages": 1,
            "segmix_background_weight": 0.0,
            "random_flip": False,
            "learnable_property": "object",
        }
        mix = SegMix(argparse.Namespace(**vars(a), **flags))
        mix.check(concepts)
        per_image = -(-a.num // sum(len(c.images) for c in concepts))
        pool = CollagePool(mix.cut, concepts, a.resolution, per_image, seeds.stream(a.seed, "segmix"))
        shown = range(0, len(pool), max(1, len(pool) // a.num))[: a.num]
        tiles, labels, zoom = [], [], max(1, 128 // a.resolution)  # small collages shown enlarged, pixel for pixel
        for i in shown:
            mask = Image.fromarray(pool.masks[i, 0].numpy().astype(np.uint8) * 255)
            tiles += [im.resize((a.resolution * zoom,) * 2, Image.Resampling.NEAREST) for im in (pool.image(i), mask)]
            left, right = (concepts[c].name for c in pool.sides[i])
            labels += [f"{left} | {right}", "loss mask"]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        grid(tiles, cols=4, captions=labels).save(out / "grid.png")
        (out / "captions.json").write_text(json.dumps([pool.captions[i] for i in shown], indent=2) + "\n")
        print(f"wrote {out / 'grid.png'}: {len(shown)} collages, each beside its loss mask (white)")


if __name__ == "__main__":
    preview()
