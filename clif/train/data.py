"""Training data of stages 2 and 3: caption templates, preprocessing, the deterministic sample stream, latent cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from clif import seeds
from clif.concepts import Concept, concept_slots, open_rgb
from clif.tokens import expand_prompt

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


def preprocess(
    img: Image.Image, resolution: int, center_crop: bool
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """RGB image -> ([3, R, R] in [-1, 1], original (h, w), crop top-left in the resized image)."""
    img = img.convert("RGB")
    w, h = img.size
    crop = (0, 0)
    if center_crop:
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        img = img.crop((left, top, left + side, top + side))
        scale = resolution / side
        crop = (round(top * scale), round(left * scale))
    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0), (h, w), crop


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths, resolution, center_crop):
        self.paths, self.resolution, self.center_crop = paths, resolution, center_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        x, size, crop = preprocess(open_rgb(self.paths[i]), self.resolution, self.center_crop)
        return x, torch.tensor([*size, *crop])


@dataclass
class Sample:
    """One micro-batch as the loop needs it."""

    pixels: torch.Tensor | None  # [B, 3, R, R] (None with a latent cache)
    image_index: torch.Tensor  # [B]
    flip: torch.Tensor  # [B] bool
    captions: list[str]
    time_ids: torch.Tensor  # [B, 6] SDXL size/crop conditioning
    collage: torch.Tensor | None = None  # [B] Seg-Mix: the item's collage in the pool, -1 for a single image
    loss_mask: torch.Tensor | None = None  # [B, 1, R, R] in [0, 1]: where the loss counts (Seg-Mix); None: all


def stream_items(k: int, global_batch: int, rank: int = 0, local_batch: int | None = None) -> range:
    """The stream positions of micro-batch k that process `rank` reads."""
    local_batch = local_batch or global_batch
    start = k * global_batch + rank * local_batch
    return range(start, start + local_batch)


class ConceptImages:
    """Every image of the concepts, decoded and preprocessed once (few-shot sets fit in memory).

    The sample stream is random-access. Epoch e holds each concept's share of samples (`concept_slots`: equal per
    concept under `concepts` balance, per image under `images`, weighted by the concepts' repeats): each of its
    images as often as the share allows and the remainder drawn without replacement, all in one order; item j of
    the stream is item j mod L of epoch j // L, with its flip and caption template. Everything epoch e draws comes
    from a generator seeded by (seed, e), so micro-batch k of a run is a pure function of (seed, k), which makes
    resume and multi-process sharding exact. With equal image counts and repeats both balances give the stream
    one epoch per pass over the images, as before they existed.
    """

    def __init__(
        self,
        concepts: list[Concept],
        resolution: int,
        center_crop: bool,
        *,
        property: str = "object",
        random_flip: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        balance: str = "concepts",
    ):
        self.concepts, self.resolution, self.seed, self.random_flip = concepts, resolution, seed, random_flip
        # "fixed": the caption is the concept's token itself (class images of prior preservation)
        self.templates = {"style": STYLE_TEMPLATES, "fixed": ["{}"]}.get(property, OBJECT_TEMPLATES)
        paths, owners = [], []
        for ci, c in enumerate(concepts):
            paths += c.images
            owners += [ci] * len(c.images)
        loader = torch.utils.data.DataLoader(
            _Decode(paths, resolution, center_crop), batch_size=8, num_workers=num_workers
        )
        xs, metas = zip(*loader)
        self.pixels = torch.cat(xs)
        meta = torch.cat(metas)
        self.time_ids = torch.cat([meta, torch.tensor([[resolution, resolution]] * len(paths))], dim=1).float()
        self.owner = torch.tensor(owners)
        self.counts = [len(c.images) for c in concepts]
        self.slots = concept_slots(self.counts, [c.repeats for c in concepts], balance)  # per concept and epoch
        self.first = [sum(self.counts[:ci]) for ci in range(len(concepts))]  # index of each concept's first image
        self._epochs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        """The number of images."""
        return len(self.owner)

    @property
    def epoch_length(self) -> int:
        """Samples in one epoch of the stream (what --num_train_epochs counts)."""
        return sum(self.slots)

    def _epoch(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Epoch e: image index, flip and template of each of its items, in stream order."""
        if e not in self._epochs:
            g = torch.Generator().manual_seed(seeds.element(self.seed, e))
            items = []
            for ci, n in enumerate(self.counts):
                whole, extra = divmod(self.slots[ci], n)
                own = torch.arange(n).repeat(whole)
                if extra:  # the rest of the share: distinct images, drawn anew each epoch
                    own = torch.cat([own, torch.randperm(n, generator=g)[:extra]])
                items.append(own + self.first[ci])
            pool = torch.cat(items)
            n = len(pool)
            perm = pool[torch.randperm(n, generator=g)]
            flip = (torch.rand(n, generator=g) < 0.5) & self.random_flip
            tmpl = torch.randint(len(self.templates), (n,), generator=g)
            self._epochs = {e: (perm, flip, tmpl)}  # keep one epoch: the stream is read in order
        return self._epochs[e]

    def micro_batch(
        self, k: int, global_batch: int, rank: int = 0, local_batch: int | None = None, with_pixels: bool = True
    ) -> Sample:
        """Micro-batch k of the stream, the slice of process `rank`."""
        size = self.epoch_length
        idx, flips, caps = [], [], []
        for j in stream_items(k, global_batch, rank, local_batch):
            perm, flip, tmpl = self._epoch(j // size)
            i = int(perm[j % size])
            c = self.concepts[int(self.owner[i])]
            idx.append(i)
            flips.append(bool(flip[j % size]))
            caps.append(expand_prompt(self.templates[int(tmpl[j % size])].format(c.token), self.concepts))
        index, flip_t = torch.tensor(idx), torch.tensor(flips)
        pixels = None
        if with_pixels:
            pixels = self.pixels[index]
            pixels = torch.where(flip_t[:, None, None, None], pixels.flip(-1), pixels)
        return Sample(pixels, index, flip_t, caps, self.time_ids[index])

    def samples_per_concept(self, n: int) -> dict[str, int]:
        """How many of the first `n` samples of the stream show each concept (run_stats.json)."""
        size = self.epoch_length
        full, rest = divmod(n, size)
        counts = torch.tensor(self.slots) * full
        if rest:
            counts += torch.bincount(self.owner[self._epoch(full)[0][:rest]], minlength=len(self.concepts))
        return {c.name: int(k) for c, k in zip(self.concepts, counts)}


@torch.no_grad()
def encode_posterior(
    vae, pixels: torch.Tensor, device, dtype, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of `pixels` ([N, 3, R, R] in [-1, 1]), in batches of `batch_size`, fp32."""
    means, stds = [], []
    for s in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[s : s + batch_size].to(device, dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class LatentCache:
    """VAE posterior (mean, std) of every image and of its flipped copy, computed once."""

    def __init__(self, vae, images: ConceptImages, device, dtype, batch_size: int = 8):
        plain = encode_posterior(vae, images.pixels, device, dtype, batch_size)
        flipped = encode_posterior(vae, images.pixels.flip(-1), device, dtype, batch_size)
        self.mean = torch.stack([plain[0], flipped[0]])
        self.std = torch.stack([plain[1], flipped[1]])

    def posterior(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        f = sample.flip.long().to(self.mean.device)
        i = sample.image_index.to(self.mean.device)
        return self.mean[f, i], self.std[f, i]


@dataclass
class Shard:
    """This process's share of the global batch."""

    world: int
    rank: int
    local: int

    @classmethod
    def of(cls, accelerator, local_batch: int) -> Shard:
        return cls(accelerator.num_processes, accelerator.process_index, local_batch)

    @property
    def global_batch(self) -> int:
        return self.world * self.local


def image_stream(
    concepts: list[Concept], args, vae, device, *, seed: int | None = None, property: str | None = None
) -> tuple[ConceptImages, LatentCache | None]:
    """The decoded sample stream of a stage's flags, with its latent cache when --cache_latents."""
    data = ConceptImages(
        concepts,
        args.resolution,
        args.center_crop,
        property=property or args.learnable_property,
        random_flip=args.random_flip,
        seed=seeds.stream(args.seed, "data_order") if seed is None else seed,
        num_workers=args.dataloader_num_workers,
        balance=args.concept_balance,
    )
    return data, LatentCache(vae, data, device, vae.dtype) if args.cache_latents else None
