"""Common-concept images (stage-1 negatives): found in the concept set or generated once by the base model."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from clif.concepts import list_images


def common_images(root: Path, words: list[str], cache_dir: Path) -> dict[str, list[Path]]:
    """common/<word>/ images of the concept set, else those generated earlier into cache_dir/common/<word>/."""
    found = {}
    for word in words or sorted(p.name for p in (root / "common").glob("*") if p.is_dir()):
        for d in (root / "common" / word, cache_dir / "common" / word):
            if d.is_dir() and list_images(d):
                found[word] = list_images(d)
                break
    return found


@torch.no_grad()
def generate_common_images(
    base: str,
    words: list[str],
    n: int,
    cache_dir: Path,
    *,
    device,
    dtype,
    seed: int,
    revision: str | None = None,
    root: Path | None = None,
) -> None:
    """'a photo of a {word}' images from the base pipeline, cached in cache_dir/common/<word>/ (once); none for a
    word whose images the concept set at `root` brings (<root>/common/<word>/: those are the ones used)."""
    from diffusers import DiffusionPipeline

    from clif.images import fill_with_generated, missing_images

    given = set(common_images(root, words, root)) if root is not None else set()  # found in <root>/common/
    todo = [w for w in words if w not in given and missing_images(cache_dir / "common" / w, n)]
    if not todo:
        return
    pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype, revision=revision).to(device)
    pipe.set_progress_bar_config(disable=True)
    for word in tqdm(todo, desc="common images"):
        fill_with_generated(pipe, cache_dir / "common" / word, f"a photo of a {word}", n, seed=seed, name="{:04d}.png")
    del pipe
