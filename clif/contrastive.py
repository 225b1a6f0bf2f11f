"""Stage-1 pieces: common-concept images, pair/feature preparation, the confusion matrix and its figure."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from . import artifacts
from .augment import Pair
from .concepts import Concept
from .losses import retrieval_matrix
from .tokens import expand_prompt


def generate_common_images(
    base: str, words: list[str], n: int, cache_dir: Path, *, device, dtype, seed: int, revision: str | None = None
) -> None:
    """'a photo of a {word}' images from the base pipeline, cached in cache_dir/common/<word>/ (once)."""
    from diffusers import DiffusionPipeline

    from .images import fill_with_generated, missing_images

    todo = [w for w in words if missing_images(cache_dir / "common" / w, n)]
    if not todo:
        return
    pipe = DiffusionPipeline.from_pretrained(base, dtype=dtype, revision=revision).to(device)
    pipe.set_progress_bar_config(disable=True)
    for word in tqdm(todo, desc="common images"):
        fill_with_generated(pipe, cache_dir / "common" / word, f"a photo of a {word}", n, seed=seed, name="{:04d}.png")
    del pipe


class TextSide:
    """Caption -> projected text features through each (text encoder, paired CLIP) of the family."""

    def __init__(self, model, paired: list, concepts: list[Concept]):
        self.model, self.paired, self.concepts = model, paired, concepts

    def features(self, captions: list[str]) -> list[torch.Tensor]:
        ids = self.model.tokenize([expand_prompt(c, self.concepts) for c in captions])
        return [
            p.text_features(enc, i, tok.eos_token_id)
            for p, enc, i, tok in zip(self.paired, self.model.text_encoders, ids, self.model.tokenizers)
        ]


def confusion(text: TextSide, views: list[Pair], view_feats: list[torch.Tensor]) -> dict:
    """Text->image retrieval among the concepts on held-out views (summed over encoder pairs)."""
    n = len(text.concepts)
    with torch.no_grad():
        feats = text.features([f"a photo of {c.token}" for c in text.concepts])
    owner = torch.tensor([v.concepts[0] for v in views])
    # sum of per-pair cosine similarities = one retrieval score over all encoders of the family
    sims = sum(
        torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(v.to(t.device), dim=-1).T
        for t, v in zip(feats, view_feats)
    )
    acc, matrix = retrieval_matrix(sims, owner, n)
    return {"accuracy": acc, "matrix": matrix, "concepts": [c.name for c in text.concepts]}


def save_confusion(out: Path, before: dict, after: dict) -> None:
    """confusion.json and a two-panel heat-map confusion.png (rows: text of concept i, columns: concept j)."""
    artifacts.atomic_write_json(out / "confusion.json", {"before": before, "after": after})
    n, cell, pad = len(before["matrix"]), 48, 90
    img = Image.new("RGB", (2 * (pad + n * cell) + 20, pad + n * cell + 30), "white")
    d = ImageDraw.Draw(img)
    for k, (title, res) in enumerate((("before", before), ("after", after))):
        x0 = k * (pad + n * cell + 20) + pad
        d.text((x0, 8), f"{title}: accuracy {res['accuracy']:.2f}", fill="black")
        for i, row in enumerate(res["matrix"]):
            d.text((x0 - pad + 4, pad + i * cell + cell // 2 - 6), res["concepts"][i][:12], fill="black")
            for j, v in enumerate(row):
                shade = int(255 * (1 - v))
                box = (x0 + j * cell, pad + i * cell, x0 + (j + 1) * cell - 1, pad + (i + 1) * cell - 1)
                d.rectangle(box, fill=(shade, shade, 255))
                d.text((box[0] + 10, box[1] + cell // 2 - 6), f"{v:.2f}", fill="black" if v < 0.6 else "white")
        for j, name in enumerate(res["concepts"]):
            d.text((x0 + j * cell + 2, pad - 16), name[:8], fill="black")
    from .images import save_png

    save_png(img, out / "confusion.png")
