"""Ground-truth scoring of generated toy-world images with the referee.

A single-concept prompt is *faithful* when the referee reads exactly one object and it is that concept.
A two-concept prompt ("a <a> on the left and a <b> on the right") gets exactly one kind:
- `correct`: the left slot shows the left concept, the right slot the right one;
- `missing`: not two objects left and right (one concept, or both, missing; e.g. one ball in the centre);
- `swapped`: both concepts, on the wrong sides;
- `same`: the same concept twice;
- `mixture`: a slot shows an object that is neither concept but shows something only the first concept has and
  something only the second has (class, a colour, or the mark: of a red ball and a blue box, a red box, a blue
  ball, or a red ball with a blue top);
- `other`: anything else (a slot shows something unrelated to either concept: a fidelity failure).
Confusion = missing + swapped + same + mixture; correct + other + confusion = 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .referee import Read
from .world import Obj

KINDS = ("correct", "missing", "swapped", "same", "mixture", "other")
CONFUSION_KINDS = ("missing", "swapped", "same", "mixture")


def features(obj: Obj) -> set[tuple[str, str]]:
    """What can be seen of an object: its class, every colour it shows (body and mark) and its mark."""
    shown = {("color", obj.color)} | ({("color", obj.pattern_color)} if obj.pattern != "solid" else set())
    return {("cls", obj.cls), ("mark", obj.pattern)} | shown


def name_of(obj: Obj | None, concepts: dict[str, Obj]) -> str | None:
    """Which concept `obj` is; 'mix' when it is neither but shows something that only the first concept has and
    something that only the second has (a red ball with a blue top, of a red ball and a blue box); 'other'
    otherwise; None for no object."""
    if obj is None:
        return None
    for name, c in concepts.items():
        if c.identity() == obj.identity():
            return name
    a, b = (features(c) for c in concepts.values())
    seen = features(obj)
    return "mix" if seen & (a - b) and seen & (b - a) else "other"


def pair_kind(read: Read, want: tuple[str, str], concepts: dict[str, Obj]) -> str:
    """The kind (see the module doc) of one two-concept image whose prompt wants `want` = (left, right)."""
    if read.layout != "left+right":
        return "missing"
    got = (name_of(read.slots["left"], concepts), name_of(read.slots["right"], concepts))
    if got == want:
        return "correct"
    if got == want[::-1]:
        return "swapped"
    if got[0] == got[1] and got[0] in concepts:
        return "same"
    if "mix" in got:
        return "mixture"
    return "other"


def faithful(read: Read, want: str, concepts: dict[str, Obj]) -> bool:
    objs = read.objects()
    return len(objs) == 1 and name_of(objs[0], concepts) == want


def prompt_concepts(prompt: str, names: list[str]) -> list[str]:
    """The concepts a prompt names, in the order they appear."""
    found = [(prompt.index(f"<{n}>"), n) for n in names if f"<{n}>" in prompt]
    return [n for _, n in sorted(found)]


def score_images(reads: list[Read], prompts: list[str], concepts: dict[str, Obj]) -> dict:
    """Fidelity over single-concept prompts, the kinds over two-concept prompts; per-image rows included."""
    rows, single, pair = [], [], []
    for read, prompt in zip(reads, prompts):
        names = prompt_concepts(prompt, list(concepts))
        seen = [f"{o.slot}: {o.phrase()}" for o in read.objects()]
        if len(names) == 1:
            hit = faithful(read, names[0], concepts)
            single.append(hit)
            rows.append({"prompt": prompt, "want": names, "read": seen, "faithful": hit})
        elif len(names) == 2:
            kind = pair_kind(read, (names[0], names[1]), concepts)
            pair.append(kind)
            rows.append(
                {"prompt": prompt, "want": names, "read": seen, "kind": kind, "confused": kind in CONFUSION_KINDS}
            )
    out = {"fidelity": float(np.mean(single)) if single else float("nan"), "n_single": len(single)}
    for k in KINDS:
        out[f"pair_{k}"] = float(np.mean([p == k for p in pair])) if pair else float("nan")
    out["oracle_confusion"] = float(np.mean([p in CONFUSION_KINDS for p in pair])) if pair else float("nan")
    out["n_pair"] = len(pair)
    out["rows"] = rows
    return out


def read_generated(folder: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """inference.py's images in `folder` (sorted) with their prompts: uint8 [N, H, W, 3], prompts, file names."""
    from PIL import Image

    imgs, prompts, names = [], [], []
    for side in sorted(folder.glob("*.json")):
        meta = json.loads(side.read_text())
        if "prompt" not in meta or not side.with_suffix(".png").is_file():
            continue
        imgs.append(np.asarray(Image.open(side.with_suffix(".png")).convert("RGB")))
        prompts.append(meta["prompt"])
        names.append(side.with_suffix(".png").name)
    return np.stack(imgs), prompts, names
