"""Stage 1's before/after confusion matrix: text->image retrieval among the concepts, on held-out and train views."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clif.contrastive.augment import PairBuilder
from clif.contrastive.figures import confusion_figure
from clif.contrastive.text_side import TextSide
from clif.outputs.artifacts import atomic_write_json
from clif.retrieval import retrieval_matrix

HELD_OUT = "photos held out of pair building, each composed on fresh backgrounds, scales and flips"
TRAIN_VIEWS = "new compositions of the very photos the pairs were cut from (optimistic)"


class ConfusionProbe:
    """Composed views with their frozen image features; measures the matrix for the current token rows."""

    def __init__(self, builder: PairBuilder, paired: list, per_concept: int, seed: int):
        self.names = [c.name for c in builder.concepts]
        self.held_files = {c.name: [p.name for p in files] for c, files in zip(builder.concepts, builder.held_files)}
        self.sets = {}
        held = builder.views(per_concept, seed, held_out=True)
        if len({v.concepts[0] for v in held}) >= 2:  # a retrieval among one concept measures nothing
            self.sets["held_out"] = held
        self.sets["train_views"] = builder.views(per_concept, seed, held_out=False)
        self.no_held_out = (
            "--holdout_images is 0"
            if not builder.holdout
            else f"fewer than two concepts have >= {builder.images_to_hold_out} images (--holdout_images "
            f"{builder.holdout} + 2 kept for training)"
        ) + ", so none could be held out"
        self.feats = {k: [p.image_features([v.image for v in views]) for p in paired] for k, views in self.sets.items()}

    @torch.no_grad()
    def measure(self, text: TextSide) -> dict[str, dict]:
        """Per view set: {"accuracy", "matrix", "concepts"} over the concepts that have views in it."""
        out = {}
        for key, views in self.sets.items():
            present = sorted({v.concepts[0] for v in views})
            feats = text.features([f"a photo of {text.concepts[i].token}" for i in present])
            owner = torch.tensor([present.index(v.concepts[0]) for v in views])
            # sum of per-encoder cosine similarities = one retrieval score over all encoders of the family
            sims = sum(
                F.normalize(t, dim=-1) @ F.normalize(f.to(t.device), dim=-1).T for t, f in zip(feats, self.feats[key])
            )
            acc, matrix = retrieval_matrix(sims, owner, len(present))
            out[key] = {"accuracy": acc, "matrix": matrix, "concepts": [self.names[i] for i in present]}
        return out

    def write(self, out: Path, before: dict[str, dict], after: dict[str, dict]) -> None:
        """confusion.json (each matrix labelled with the views it was measured on) and confusion.png."""
        held = (
            {"views": HELD_OUT, "before": before["held_out"], "after": after["held_out"]}
            if "held_out" in self.sets
            else {"views": None, "reason": self.no_held_out}
        )
        report = {
            "held_out": {**held, "images": self.held_files},
            "train_views": {"views": TRAIN_VIEWS, "before": before["train_views"], "after": after["train_views"]},
        }
        atomic_write_json(out / "confusion.json", report)
        rows = [("held-out photos", before["held_out"], after["held_out"])] if "held_out" in self.sets else []
        rows.append(("train photos", before["train_views"], after["train_views"]))
        confusion_figure(rows, out / "confusion.png")
