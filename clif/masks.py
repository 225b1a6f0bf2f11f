"""Concept masks: user masks (dataset/README.md) or text-prompted CLIPSeg masks, cached on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clif import cli
from clif.concepts import open_rgb
from clif.errors import UserError, loading
from clif.validate import ModelSource, check_models

DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
MIN_AREA = 0.005  # a mask covering less than 0.5 % of the image is not usable


def add_segmenter_args(g, *, cache_help: str) -> None:
    """--segmenter (result-changing) and --cache_dir (harmless) of the stages that cut concepts out (1, and 3's
    Seg-Mix)."""
    g.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="CLIPSeg model for concepts/parts without masks.")
    cli.harmless(g.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "clif"), help=cache_help))


def user_mask(masks_dir: Path | None, image: Path, part: str | None = None) -> Path | None:
    """masks/<name>/<stem>.png (whole concept) or <stem>__<part>.png, if the user gave it."""
    if masks_dir is None:
        return None
    p = masks_dir / (f"{image.stem}__{part}.png" if part else f"{image.stem}.png")
    return p if p.is_file() else None


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Binary mask (bool HxW) resized to the image `size` (w, h); white = concept."""
    try:
        with Image.open(path) as m:
            m = m.convert("L").resize(size, Image.Resampling.NEAREST)
    except Exception as err:  # noqa: BLE001  PIL raises many types for broken files
        raise UserError(f"cannot read mask {path}: {err}") from None
    return np.asarray(m) >= 128


def check_usable(mask: np.ndarray, what: str) -> np.ndarray:
    if mask.mean() < MIN_AREA:
        raise UserError(f"{what}: the mask is empty (no usable mask); fix or remove it")
    return mask


def concept_mask(
    image: Path, masks_dir: Path | None, prompt: str, segmenter: Segmenter | None, size, part: str | None = None
) -> np.ndarray:
    """The usable bool mask of `image` (at `size`, (w, h)): the user's (masks/<name>/<stem>[__<part>].png), else the
    segmenter's, prompted with `prompt`."""
    given = user_mask(masks_dir, image, part)
    if given is not None:
        return check_usable(load_mask(given, size), str(given))
    if segmenter is None:
        raise UserError(f"no mask for {image}{' part ' + part if part else ''} and no segmenter")
    return check_usable(segmenter.mask(image, prompt), f"{image} (segmented as {prompt!r})")


class Segmenter:
    """Text-prompted masks from a CLIPSeg model, cached as PNG under `cache_dir` (keyed by image, prompt, model)."""

    def __init__(self, name_or_path: str, cache_dir: Path, device: torch.device | str = "cpu"):
        self.name, self.cache_dir, self.device = name_or_path, Path(cache_dir), torch.device(device)
        self._model = self._processor = None

    def _load(self) -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        avoid = "give --segmenter a local CLIPSeg folder, or a mask for every image (dataset/README.md)"
        check_models([ModelSource("--segmenter", self.name, "segmenter", avoid, self.name != DEFAULT_SEGMENTER)])
        with loading("segmenter", self.name):
            self._processor = CLIPSegProcessor.from_pretrained(self.name)
            self._model = CLIPSegForImageSegmentation.from_pretrained(self.name).to(self.device).eval()

    def _key(self, image: Path, prompt: str) -> Path:
        st = image.stat()
        h = hashlib.sha256(f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}|{prompt}|{self.name}".encode())
        return self.cache_dir / f"{h.hexdigest()[:24]}.png"

    @torch.no_grad()
    def mask(self, image: Path, prompt: str) -> np.ndarray:
        """Bool mask of `prompt` in `image` at the image's size."""
        path = self._key(image, prompt)
        im = open_rgb(image)
        size = im.size
        if not path.is_file():
            if self._model is None:
                self._load()
            inputs = self._processor(text=[prompt], images=[im], padding="max_length", return_tensors="pt")
            prob = (
                torch.sigmoid(self._model(**inputs.to(self.device)).logits)
                .reshape(inputs["pixel_values"].shape[-2:])
                .cpu()
            )
            # relative threshold: CLIPSeg's scale varies per prompt; half the peak keeps the object
            m = (prob >= 0.5 * prob.max()).numpy().astype(np.uint8) * 255
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).resize(size, Image.Resampling.BILINEAR).save(path)
        return load_mask(path, size)


def cut_out(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The masked pixels of `image` as RGBA, cropped to the mask's bounding box (alpha = mask)."""
    rgba = image.convert("RGB").copy()
    rgba.putalpha(Image.fromarray(mask.astype(np.uint8) * 255))
    ys, xs = np.nonzero(mask)
    return rgba.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
