"""evaluate.py's machinery: reading image folders, the references, scoring (the models: clif/eval/backbones.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from clif.concepts import Concept, check_image, list_images, open_rgb
from clif.contrastive.common_concepts import common_images
from clif.errors import UserError
from clif.eval import kinds, metrics
from clif.eval.backbones import Backbone, Detector
from clif.eval.dc import pad_to_white_square
from clif.validate import existing_folder, get_field, read_json


@dataclass
class Item:
    path: Path
    prompt: str


def read_folder(folder: str | Path) -> list[Item]:
    """PNGs with inference.py's JSON sidecars, or a prompts.json {file: prompt} in the folder; each image is decoded
    once here, so a broken file is named before any model loads."""
    folder = existing_folder(folder, "image folder")
    mapping = {}
    if (folder / "prompts.json").exists():
        mapping = read_json(folder / "prompts.json")
        for name in mapping:
            get_field(mapping, name, str, str(folder / "prompts.json"))
    items = []
    for p in list_images(folder):
        if p.name == "contact_sheet.png":
            continue
        check_image(p)
        if p.name in mapping:
            items.append(Item(p, mapping[p.name]))
        elif p.with_suffix(".json").is_file():
            sidecar = p.with_suffix(".json")
            items.append(Item(p, get_field(read_json(sidecar), "prompt", str, str(sidecar))))
        else:
            raise UserError(f"{p} has no prompt: no {p.with_suffix('.json').name} sidecar and not in prompts.json")
    if not items:
        raise UserError(f"no images in {folder}")
    return items


@dataclass
class References:
    """Each concept's reference photos embedded once, for every folder scored: CLIP (`clip`), DINO and the D&C model
    where given (`dino`, `dc`; else empty), and the concept set's `common/<class>/` images of the concepts'
    classes in CLIP (`common`, clif/eval/kinds.py; classes without such images are absent)."""

    clip: dict[str, torch.Tensor]
    dino: dict[str, torch.Tensor]
    dc: dict[str, torch.Tensor]
    common: dict[str, torch.Tensor]

    @classmethod
    def of(cls, concepts: list[Concept], set_root: Path, batch_size: int, *, backbone, dino=None, dc_model=None):
        out = cls({}, {}, {}, {})
        for c in concepts:
            ims = [open_rgb(p) for p in c.images]
            out.clip[c.name] = backbone.images(ims, batch_size)
            if dino is not None:
                out.dino[c.name] = dino.images(ims, batch_size)
            if dc_model is not None:
                out.dc[c.name] = dc_model(ims, batch_size)
        found = common_images(set_root, sorted({c.class_word for c in concepts}), set_root)
        out.common = {w: backbone.images([open_rgb(p) for p in ps], batch_size) for w, ps in found.items()}
        return out


def _halves(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    return [image.crop((0, 0, w // 2, h)), image.crop((w // 2, 0, w, h))]


def score_folder(
    items: list[Item],
    concepts: list[Concept],
    refs: dict[str, torch.Tensor],
    backbone: Backbone,
    *,
    batch_size: int,
    margin: float,
    detector: Detector | None = None,
    dino=None,
    dino_refs: dict[str, torch.Tensor] | None = None,
    feature_fn=None,
    match_refs: dict[str, torch.Tensor] | None = None,
    common_refs: dict[str, torch.Tensor] | None = None,
    class_texts: dict[str, torch.Tensor] | None = None,
    decision: str = "kinds",
    kind_settings: kinds.Settings = kinds.SETTINGS,
) -> list[dict]:
    """One row per image: text/image alignment, and for two-concept prompts found / confused / kind.

    Instances are matched to concepts with `feature_fn` against `match_refs` (default: the CLIP backbone
    and `refs`); tests pass controlled features there. `common_refs` (class word -> features in the same space)
    are the concept set's common images of each class, `class_texts` (class word -> the text feature of "a photo of a
    <class>"; default: the backbone's, unless `feature_fn` is given) the class words (clif/eval/kinds.py);
    `decision` picks what `confused`
    says: "kinds" (clif/eval/kinds.py) or "margin" (the fixed-margin rule, always kept as `confused_margin`).
    """
    match_refs = match_refs if match_refs is not None else refs
    common_refs = common_refs or {}
    gaps: dict[tuple[str, str], list] = {}  # the references' leave-one-out gaps, per ordered pair
    by_token = {c.token: c for c in concepts}
    class_of = {c.token: c.class_word for c in concepts}
    images = [open_rgb(it.path) for it in items]
    feats = backbone.images(images, batch_size)
    texts = backbone.texts([metrics.replace_tokens(it.prompt, class_of) for it in items], batch_size)
    score, cos = metrics.clip_score(feats, texts)
    dino_feats = dino.images(images, batch_size) if dino is not None else None
    embed = feature_fn or (lambda ims: backbone.images(ims, batch_size))
    if class_texts is None and feature_fn is None:
        words = sorted({c.class_word for c in concepts})
        class_texts = dict(zip(words, backbone.texts([f"a photo of a {w}" for w in words], batch_size)))

    def kind_of(inst: torch.Tensor, pair: list[Concept], positional: bool) -> dict:
        """clif/eval/kinds.py's reading of one image's two (padded) instances; the prompt's concept order."""
        refs_ = [match_refs[c.name] for c in pair]
        key = (pair[0].name, pair[1].name)
        if key not in gaps:
            gaps[key] = kinds.calibrate(refs_)
        s, k = kinds.instance_sims(inst, refs_, [common_refs.get(c.class_word) for c in pair])
        same_class = pair[0].class_word == pair[1].class_word
        cls, cgap = None, None
        if not same_class and class_texts:
            texts = [class_texts[c.class_word] for c in pair]
            cls, cgap = kinds.class_sims(inst, texts), kinds.class_gap(refs_, texts)
        d = kinds.decide(s, k, gaps[key], positional, same_class, kind_settings, cls, cgap)
        return {
            "kind": d["kind"],
            "kind_labels": [pair[x].name if isinstance(x, int) else x for x in d["labels"]],
            "kind_sims": s,
            "kind_common": k,
            "kind_class": cls,
            "kind_class_gap": cgap,
            "kind_gap": gaps[key],
        }

    rows = []
    for k, (it, im) in enumerate(tqdm(list(zip(items, images)), desc="scoring", leave=False)):
        named = metrics.tokens_in(it.prompt, list(by_token))
        row = {
            "file": it.path.name,
            "prompt": it.prompt,
            "concepts": [by_token[t].name for t in named],
            "text_alignment": float(score[k]),
            "text_cosine": float(cos[k]),
            "image_alignment": {
                by_token[t].name: float(metrics.mean_cosine(feats[k : k + 1], refs[by_token[t].name])[0]) for t in named
            },
        }
        if dino_feats is not None:
            row["dino_alignment"] = {
                by_token[t].name: float(metrics.mean_cosine(dino_feats[k : k + 1], dino_refs[by_token[t].name])[0])
                for t in named
            }
        if len(named) == 2:
            crops, method = [], "none"
            if detector is not None:
                boxes = sorted(detector.two_boxes(im, [by_token[t].class_word for t in named]))
                if len(boxes) == 2:
                    crops, method = [im.crop(b) for b in boxes], "detector"
            if not crops and metrics.says_left_right(it.prompt):
                crops, method = _halves(im), "halves"
            sims, kind = None, None
            if crops:
                pair = [by_token[t] for t in named]
                cf = embed(crops)
                sims = torch.stack([metrics.mean_cosine(cf, match_refs[c.name]) for c in pair], dim=1)
                padded = [pad_to_white_square(c, (0, 0, *c.size)) for c in crops]  # scale kept (kinds.py)
                kind = kind_of(embed(padded), pair, metrics.says_left_right(it.prompt))
            found, confused_margin = metrics.confusion_decision(sims, margin)
            row.update(found=found, confused_margin=confused_margin, instances=method)
            row["confusion_sims"] = sims.tolist() if sims is not None else None  # clif.eval.agreement's CLIP score
            row.update(
                kind
                or dict.fromkeys(
                    ("kind", "kind_labels", "kind_sims", "kind_common", "kind_class", "kind_class_gap", "kind_gap")
                )
            )
            row["confused"] = confused_margin if decision == "margin" else row["kind"] in kinds.CONFUSED
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Means over images (text), over (image, concept) entries (image), and the confusion counts."""

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    ia = [v for r in rows for v in r["image_alignment"].values()]
    per_concept: dict[str, list[float]] = {}
    for r in rows:
        for name, v in r["image_alignment"].items():
            per_concept.setdefault(name, []).append(v)
    pairs = [r for r in rows if "found" in r]
    found = [r for r in pairs if r["found"]]
    out = {
        "images": len(rows),
        "text_alignment": mean([r["text_alignment"] for r in rows]),
        "text_cosine": mean([r["text_cosine"] for r in rows]),
        "image_alignment": mean(ia),
        "image_alignment_per_concept": {k: mean(v) for k, v in sorted(per_concept.items())},
        "pair_images": len(pairs),
        "attendance": len(found) / len(pairs) if pairs else None,
        "confusion_rate": sum(r["confused"] for r in found) / len(found) if found else None,
        "confusion_rate_margin": (
            sum(r["confused_margin"] for r in found) / len(found) if found and "confused_margin" in found[0] else None
        ),
    }
    if any(r.get("kind") for r in found):
        out.update({f"kind_{k}": v for k, v in kinds.kind_shares(found).items()})
    dino = [v for r in rows for v in r.get("dino_alignment", {}).values()]
    if dino:
        out["dino_alignment"] = mean(dino)
    return out


def per_prompt(rows: list[dict]) -> list[dict]:
    """Rows grouped by prompt: which prompts fail."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(r)
    return [
        {"prompt": p, **{k: v for k, v in summarize(rs).items() if k != "image_alignment_per_concept"}}
        for p, rs in groups.items()
    ]


CONFUSION_KEYS = (
    "found",
    "confused",
    "confused_margin",
    "instances",
    "confusion_sims",
    "attendance",
    "confusion_rate",
    "confusion_rate_margin",
    "pair_images",
    "kind",
    "kind_labels",
    "kind_sims",
    "kind_common",
    "kind_class",
    "kind_class_gap",
    "kind_gap",
    *(f"kind_{k}" for k in kinds.KINDS),
)


def without_confusion(entry: dict) -> dict:
    """A row, summary, per-prompt or per-pair entry without the confusion metric's fields (--metrics without it)."""
    return {k: v for k, v in entry.items() if k not in CONFUSION_KEYS}
