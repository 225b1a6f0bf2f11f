"""Which confusion a two-concept image shows, from CLIP similarities alone (evaluate.py's default decision).

A metric for real photos: nothing here knows how the images were made. Its inputs, all in one CLIP space:

- the two *instances* of a two-concept image (the detector's two boxes, or the image halves for "on the left ... on
  the right" prompts), each pasted on a white square (`dc.pad_to_white_square`, scale kept: a zoomed half is not
  what the references look like);
- the references of the prompt's two concepts;
- optionally the concept set's `common/<class>/` images of the two concepts' classes: other members of the classes,
  i.e. what "a dog, but neither of these two dogs" looks like;
- for two concepts of different classes, the texts "a photo of a <class>" of their class words (zero-shot class).

**Calibration** (from the references alone, leave-one-out): for each reference of concept c, its mean similarity to
c's *other* references minus its mean similarity to the other concept's references. Their mean is c's `gap`: how
far genuine photos of c sit from the other concept, in this feature space, for this pair. A margin in units of the
gap adapts to the backbone and to how alike the two concepts are, where a fixed margin (0.02 before) cannot. The
class words get the same treatment: `class_gap` = how much more the references match their own class word than the
other concept's.

**Instances.** s_c = mean cosine of an instance to c's references, s_k = its mean cosine to common images, the
largest over the pair's classes. For concepts of different classes, an instance's *class* is read from the class
words when they differ by at least `class_margin` x the references' class gap (else it stays unread). An instance
*is* concept c when its class (if read) is c's, it is more like c than like the other concept (s_c - s_other >=
`margin` x gap_c) and more like c than like a common member of the classes (s_c - s_k >= `common_margin` x gap_c).
An instance that is neither is a *mixture* when it looks like one concept but its class (read) is the other's
(`class_mix`), when it is a second object of its partner's class (read from the class
words, else from the common images: the partner's class leaked) or when it is like both concepts about as much as
like the common images (min(s_A, s_B) - s_k >= `mixture_margin` x the mean gap), else *other* (like neither: a
fidelity failure, not confusion). Without common images an instance that is neither concept is a mixture.

**Image kind** from the two labels, in the prompt's order (left first for a left/right prompt, whose instances are
ordered left to right): `correct` (each its own concept), `swapped` (both concepts, sides exchanged; only for
left/right prompts -- otherwise this is `correct`), `same` (one concept twice), `mixture` (an instance mixes the
two), `other` (an instance like neither). **Confused = swapped, same or mixture.** A missing instance (fewer than two
found) is counted by attendance, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

KINDS = ("correct", "swapped", "same", "mixture", "other")
CONFUSED = ("swapped", "same", "mixture")


@dataclass(frozen=True)
class Settings:
    """The decision's margins: three in units of the references' leave-one-out gap, the class margin in units of their
    class-word gap (see the module doc)."""

    margin: float
    common_margin: float
    mixture_margin: float
    class_margin: float = 0.0  # units of the references' own class-word gap (`class_gap`)
    class_mix: bool = True  # an instance like one concept but of the other's class is a mixture (v3; v2: False)

    def as_dict(self) -> dict:
        return asdict(self)


# evaluate.py's settings, chosen on the toy world's tuning rungs (README, "Is our confusion metric right?")
# (pretrained/toyworld/confusion_metric_tuning.json: the grid, the images, the tuning rungs' kappas)
SETTINGS = Settings(margin=0.0, common_margin=-0.3, mixture_margin=-0.2, class_margin=0.1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def loo_gap(own: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over `own`'s rows of (mean cosine to the other rows of `own`) - (mean cosine to the rows of `other`).

    A single reference has nothing to leave out: its own similarity counts as 1 (an optimistic gap, said in the
    README)."""
    n = own.shape[0]
    a, b = _unit(own), _unit(other)
    g = a @ a.T
    loo = (g.sum(dim=1) - g.diagonal()) / (n - 1) if n > 1 else torch.ones(1, dtype=torch.float64)
    return float((loo - (a @ b.T).mean(dim=1)).mean())


def calibrate(refs: Sequence[torch.Tensor]) -> list[float]:
    """The leave-one-out gap of each of the two concepts against the other (refs in the prompt's order)."""
    return [loo_gap(refs[0], refs[1]), loo_gap(refs[1], refs[0])]


def instance_sims(
    feats: torch.Tensor, refs: Sequence[torch.Tensor], common: Sequence[torch.Tensor | None] = (None, None)
) -> tuple[list[list[float]], list[list[float]] | None]:
    """Per instance, [s_A, s_B]: the mean cosines to each concept's references; and [k_A, k_B]: the mean cosines to
    the common images of each concept's class (`common` in the prompt's order; None without common images)."""
    f = _unit(feats)

    def mean_cos(sets):
        return torch.stack([(f @ _unit(r).T).mean(dim=1) for r in sets], dim=1).tolist()

    have = all(c is not None and c.shape[0] > 0 for c in common)
    return mean_cos(refs), (mean_cos(common) if have else None)


def class_sims(feats: torch.Tensor, texts: Sequence[torch.Tensor]) -> list[list[float]]:
    """Per instance, [t_A, t_B]: the cosine to the text "a photo of a <class>" of each concept's class (zero-shot)."""
    return (_unit(feats) @ _unit(torch.stack([t.reshape(-1) for t in texts])).T).tolist()


def class_gap(refs: Sequence[torch.Tensor], texts: Sequence[torch.Tensor]) -> list[float]:
    """Per concept, the mean over its references of (cosine to its own class word - to the other concept's): how
    clearly the class words tell genuine photos of the two classes apart."""
    out = []
    for c in (0, 1):
        t = class_sims(refs[c], texts)
        out.append(sum(row[c] - row[1 - c] for row in t) / len(t))
    return out


def like(s, k, gap, settings: Settings, c: int) -> bool:
    """The instance looks like concept c: more than like the other concept and than like the common images."""
    clear = s[c] - s[1 - c] >= settings.margin * gap[c]
    return clear and (k is None or s[c] - max(k) >= settings.common_margin * gap[c])


def concept_label(s, k, gap, settings: Settings, cls: Sequence[float] | None = None):
    """0 or 1 when the instance is that concept (see the module doc), else None. With `cls` (two concepts of
    different classes) only the concept of the instance's class qualifies."""
    for c in (0, 1):
        if cls is not None and cls[c] <= cls[1 - c]:
            continue
        if like(s, k, gap, settings, c):
            return c
    return None


def neither_label(s, k, gap, partner, same_class: bool, settings: Settings, cls=None) -> str:
    """'mix' or 'other' for an instance that is neither concept; `partner` = the other instance's concept label;
    `cls` as in `concept_label` (its class, by the class words), else the common images tell the class."""
    if cls is not None and settings.class_mix and any(like(s, k, gap, settings, c) for c in (0, 1)):
        return "mix"  # it looks like one concept but has the other's class: the two are mixed in one object
    leaked = cls if cls is not None else k
    if not same_class and partner is not None and leaked is not None and leaked[partner] > leaked[1 - partner]:
        return "mix"  # a second object of the partner's class that is not the partner: the class leaked
    if k is None:
        return "mix"  # it sits between the two concepts: nothing tells "like neither" apart without common images
    return "mix" if min(s) - max(k) >= settings.mixture_margin * (gap[0] + gap[1]) / 2 else "other"


def image_kind(labels: Sequence, positional: bool) -> str:
    """The kind of one image from its two instances' labels (in the prompt's order; see the module doc)."""
    a, b = labels
    if a in (0, 1) and b in (0, 1):
        if a == b:
            return "same"
        return "correct" if (a, b) == (0, 1) or not positional else "swapped"
    if "mix" in (a, b):
        return "mixture"
    return "other"


def decide(
    sims: Sequence[Sequence[float]],
    common: Sequence[Sequence[float]] | None,
    gap: Sequence[float],
    positional: bool,
    same_class: bool,
    settings: Settings,
    classes: Sequence[Sequence[float]] | None = None,
    classes_gap: Sequence[float] | None = None,
) -> dict:
    """{"kind", "confused", "labels"} of one image from its instances' similarities (as `instance_sims` gives them),
    the pair's gaps (`calibrate`) and, for concepts of different classes, the class-word cosines (`class_sims`) and
    the references' class-word gaps (`class_gap`)."""
    ks = [None, None] if common is None else common
    cs = [None, None]
    if classes is not None and not same_class:
        # an instance's class is read only where its class words differ by `class_margin` x the references' gap
        need = settings.class_margin * sum(classes_gap) / 2 if classes_gap else 0.0
        cs = [c if abs(c[0] - c[1]) >= need and c[0] != c[1] else None for c in classes]
    first = [concept_label(s, ks[i], gap, settings, cs[i]) for i, s in enumerate(sims)]
    labels = [
        x if x is not None else neither_label(sims[i], ks[i], gap, first[1 - i], same_class, settings, cs[i])
        for i, x in enumerate(first)
    ]
    kind = image_kind(labels, positional)
    return {"kind": kind, "confused": kind in CONFUSED, "labels": labels}


def kind_shares(rows: list[dict]) -> dict:
    """The share of each kind among rows with a kind (the images where two instances were found)."""
    kinds = [r["kind"] for r in rows if r.get("kind") is not None]
    return {k: (sum(x == k for x in kinds) / len(kinds) if kinds else None) for k in KINDS}
