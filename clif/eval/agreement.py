"""Is a mixing metric right? Per-image agreement with ground truth (the toy world's oracle).

In the toy world the oracle knows what each half of a generated image shows, so it gives a ground-truth
"confused" per image. This module compares any per-image metric with it:

- binary decisions (CLIF's CLIP confusion: the kinds decision and, beside it, the fixed-margin rule; or D&C below
  a cut): agreement rate and Cohen's kappa; `kind_matrix` counts ground-truth kind x our kind;
- scores (higher = more confused: `clip_confusion_score`, `1 - D&C`): Spearman rank correlation with the oracle
  (average ranks for ties, so a 0/1 oracle is fine) -- plain numpy, no scipy.

How the toy-world experiment calls it, per method folder (images + `oracle.json` + evaluate.py's metrics.json):

    from clif.eval.agreement import compare_folder
    report = compare_folder(folder, oracle_json, metrics_json, concepts_dir, WORLD / "paired_clip")

`compare_folder` scores D&C with the two image halves as the boxes and the world's CLIP image tower as the
feature model (`halves_dc`), joins the rows by image file name, and returns the table `agreement` builds.
Or from the shell: `python -m clif.eval.agreement --images F --oracle F/oracle.json --metrics E/metrics.json
--concepts DATA --clip_model WORLD/paired_clip --out F/agreement.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dc import dc_of_crops


def agreement_rate(a: Sequence[bool], b: Sequence[bool]) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((a == b).mean())


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """(p_o - p_e) / (1 - p_e) for two binary raters; None when chance agreement is 1 (both constant, equal)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return None if pe >= 1.0 else (po - pe) / (1.0 - pe)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson correlation of the average ranks; None when either side is constant (undefined)."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def clip_confusion_score(sims: Sequence[Sequence[float]]) -> float:
    """A continuous version of CLIF's confusion decision (higher = more confused).

    sims[k][c]: similarity of instance k to concept c (2 x 2). The score is minus the best assignment's worst
    margin: -max over the two one-to-one assignments of min_k (own - other). `metrics.confusion_decision`
    says confused exactly when this score > -margin.
    """
    s = np.asarray(sims, float)
    straight = min(s[0, 0] - s[0, 1], s[1, 1] - s[1, 0])
    crossed = min(s[0, 1] - s[0, 0], s[1, 0] - s[1, 1])
    return -max(straight, crossed)


def agreement(rows: list[dict], dc_cut: float = 0.5) -> dict:
    """rows: {"oracle": bool, "clip": bool | None, "clip_score": float | None, "dc": float | None} per image.

    Returns per metric: images compared, agreement rate and kappa of its decision with the oracle, Spearman of
    its score (higher = more confused) with the oracle. D&C's decision: D&C < `dc_cut`.
    """
    out = {"images": len(rows), "oracle_confusion": float(np.mean([r["oracle"] for r in rows])) if rows else None}
    metrics: dict[str, tuple[Callable, Callable]] = {
        "clip_confusion": (lambda r: r.get("clip"), lambda r: r.get("clip_score")),
        # the fixed-margin rule (evaluate.py --confusion_decision margin), kept beside the default decision
        "clip_confusion_margin": (lambda r: r.get("clip_margin"), lambda r: r.get("clip_score")),
        "dc": (
            lambda r: None if r.get("dc") is None else r["dc"] < dc_cut,
            lambda r: None if r.get("dc") is None else 1.0 - r["dc"],
        ),
    }
    for name, (decide, score) in metrics.items():
        dec = [(r["oracle"], decide(r)) for r in rows if decide(r) is not None]
        if name == "clip_confusion_margin" and not dec:
            continue  # metrics.json written before the margin rule got its own field
        sco = [(float(r["oracle"]), score(r)) for r in rows if score(r) is not None]
        entry = {"images": len(dec)}
        if dec:
            o, d = zip(*dec)
            entry.update(agreement=agreement_rate(o, d), kappa=cohen_kappa(o, d), rate=float(np.mean(d)))
        if sco:
            o, s = zip(*sco)
            entry["spearman"] = spearman(o, s)
            entry["scored_images"] = len(sco)
        out[name] = entry
    out["dc"]["cut"] = dc_cut
    return out


def halves(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    return [image.crop((0, 0, w // 2, h)), image.crop((w // 2, 0, w, h))]


def halves_dc(image: Image.Image, refs: Sequence[torch.Tensor], embed: Callable) -> dict:
    """D&C with the left and right halves as the two boxes; refs in (left subject, right subject) order."""
    return dc_of_crops(halves(image.convert("RGB")), refs, embed)


def join_rows(oracle_rows: list[dict], eval_rows: list[dict], dc: dict[str, float] | None = None) -> list[dict]:
    """One row per image in both: oracle.json rows ("image", "confused") x evaluate.py rows ("file", ...)."""
    by_file = {r["file"]: r for r in eval_rows}
    out = []
    for o in oracle_rows:
        e = by_file.get(o["image"])
        if e is None or "confused" not in o:  # no verdict (e.g. a single-concept prompt): nothing to compare
            continue
        sims = e.get("confusion_sims")
        out.append(
            {
                "image": o["image"],
                "oracle": bool(o["confused"]),
                "oracle_kind": o.get("kind"),
                "clip": e["confused"] if e.get("found") else None,
                "clip_margin": e.get("confused_margin") if e.get("found") else None,
                "kind": e.get("kind") if e.get("found") else None,
                "clip_score": clip_confusion_score(sims) if sims is not None else None,
                "dc": (dc or {}).get(o["image"]),
            }
        )
    return out


def kind_matrix(rows: list[dict], ours: str = "kind") -> dict[str, dict[str, int]]:
    """Counts of (ground-truth kind, our `ours` field) over rows that have both: {oracle kind: {ours: n}}; a boolean
    field is written "confused" / "not confused"."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        o, x = r.get("oracle_kind"), r.get(ours)
        if o is None or x is None:
            continue
        x = ("confused" if x else "not confused") if isinstance(x, bool) else x
        out.setdefault(o, {}).setdefault(x, 0)
        out[o][x] += 1
    return out


def compare_folder(
    folder: Path, oracle_json: Path, metrics_json: Path, concepts_dir: Path, clip_model: str, dc_cut: float = 0.5
) -> dict:
    """The toy-world comparison for one folder of generated images (see the module docstring)."""
    return agreement(folder_rows(folder, oracle_json, metrics_json, concepts_dir, clip_model), dc_cut)


def folder_rows(folder: Path, oracle_json: Path, metrics_json: Path, concepts_dir: Path, clip_model: str) -> list:
    """The joined per-image rows of one folder (`agreement` pools rows of many folders)."""
    from clif.concepts import load_concept_set, open_rgb

    from .backbones import open_backbone
    from .metrics import tokens_in

    oracle = json.loads(Path(oracle_json).read_text())["rows"]
    ev = json.loads(Path(metrics_json).read_text())
    eval_rows = next(iter(ev.values()))["rows"]
    concepts = load_concept_set(concepts_dir)
    by_token = {c.token: c for c in concepts}
    tower = open_backbone(str(clip_model), None, "cpu")
    refs = {c.name: tower.images([open_rgb(p) for p in c.images], 16) for c in concepts}
    prompts = {r["file"]: r["prompt"] for r in eval_rows}

    def embed(images):
        return tower.images(images, 16)

    dc = {}
    for o in oracle:
        prompt = prompts.get(o["image"])
        if prompt is None:
            continue
        named = tokens_in(prompt, list(by_token))  # left subject first for left/right prompts
        if len(named) != 2:
            continue
        res = halves_dc(open_rgb(Path(folder) / o["image"]), [refs[by_token[t].name] for t in named], embed)
        dc[o["image"]] = res["dc"]
    return join_rows(oracle, eval_rows, dc)


def main(argv: list[str] | None = None) -> dict:
    from clif import cli
    from clif.outputs.artifacts import atomic_write_json

    p = cli.make_parser("python -m clif.eval.agreement", __doc__)
    p.add_argument("--images", required=True, help="The folder of generated images (with the oracle's oracle.json).")
    p.add_argument("--oracle", required=True, help="The oracle's per-image verdicts (oracle.json).")
    p.add_argument("--metrics", required=True, help="evaluate.py's metrics.json for the same folder.")
    p.add_argument("--concepts", required=True, help="The concept set (references of the two concepts).")
    p.add_argument("--clip_model", required=True, help="The world's CLIP (a transformers CLIPModel folder).")
    p.add_argument("--dc_cut", type=cli.non_negative(float), default=0.5, help="D&C below this counts as confused.")
    p.add_argument("--out", required=True, help="Where agreement.json goes.")
    args = p.parse_args(argv)
    with cli.user_errors("python -m clif.eval.agreement"):
        for flag in ("oracle", "metrics"):
            if not Path(getattr(args, flag)).is_file():
                raise cli.UserError(f"--{flag} {getattr(args, flag)}: no such file")
        report = compare_folder(
            Path(args.images), Path(args.oracle), Path(args.metrics), Path(args.concepts), args.clip_model, args.dc_cut
        )
        atomic_write_json(Path(args.out), report)
        print(json.dumps(report, indent=2))
        return report


if __name__ == "__main__":
    main()
