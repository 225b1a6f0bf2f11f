"""Automatic over-segmentation of a concept's mask into regions, for Region pairs of concepts without part names.

SLIC superpixels (scikit-image) computed only inside the mask: a few pure-numpy milliseconds per image on CPU,
deterministic (grid-seeded k-means: same image and settings, same regions), no model weights to fetch, and the
number of regions is set directly. A mask-generation model (SAM) gives semantically cleaner parts but costs
GBs of weights and a GPU, and its parts still need a caption we do not have: each region is captioned with the
concept's token, so what matters is a few compact, colour-coherent pieces of the concept, which SLIC gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

MIN_IMAGE_SHARE = 0.005  # a region under 0.5 % of the photo (16x16 px of a 224-px CLIP input) keeps no detail


@dataclass(frozen=True)
class RegionSpec:
    """How a mask is split: about `segments` superpixels (fewer for small masks, so each can keep MIN_IMAGE_SHARE
    of the photo); regions under `min_area` of the mask (edge slivers) or under MIN_IMAGE_SHARE of the photo are
    dropped; the `per_image` largest are kept."""

    segments: int = 8
    min_area: float = 0.05
    per_image: int = 4


def over_segment(image: Image.Image, mask: np.ndarray, spec: RegionSpec) -> list[np.ndarray]:
    """Bool masks of the large enough regions of `mask` in `image`, largest first (ties: top-left first)."""
    from skimage.segmentation import slic

    area = int(mask.sum())
    floor = MIN_IMAGE_SHARE * mask.size
    labels = slic(
        np.asarray(image.convert("RGB")),
        n_segments=max(2, min(spec.segments, int(area / (2 * floor)))),
        compactness=10.0,
        mask=mask,
        start_label=1,
        channel_axis=-1,
    )
    min_px = max(floor, spec.min_area * area)
    found = []
    for k in np.unique(labels[labels > 0]):
        region = labels == k
        size = int(region.sum())
        if size >= min_px:
            found.append((-size, int(np.flatnonzero(region)[0]), region))
    found.sort(key=lambda t: t[:2])
    return [r for _, _, r in found[: spec.per_image]]


def boundaries(image: Image.Image, regions: list[np.ndarray]) -> Image.Image:
    """`image` with each region tinted and outlined (the preview of `python -m clif.contrastive.augment`)."""
    from skimage.segmentation import mark_boundaries

    labels = np.zeros(image.size[::-1], dtype=np.int32)
    for k, r in enumerate(regions, 1):
        labels[r] = k
    rgb = np.asarray(image.convert("RGB")).astype(float) / 255
    return Image.fromarray((mark_boundaries(rgb, labels, color=(1, 0, 0)) * 255).astype(np.uint8))
