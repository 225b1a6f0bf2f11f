"""The demo on the toy world (`bash scripts/demo.sh`): the referee's reading of its images, and its summary and
contact-sheet figure, read from what the demo wrote.

The demo's folder holds: concepts/ (python -m clif.toyworld concepts), s1-clif/ s2-ti/ s3-lora/ (the three
stages), images-single/ images-pair/ (inference.py), eval/ (evaluate.py), referee.json (`referee` below) and
contact_sheets.png (`summary` below).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from clif.errors import UserError
from clif.outputs.artifacts import atomic_write_json

from .scoring import KINDS, read_generated, score_images

REPO = Path(__file__).resolve().parents[2]
REFEREE = REPO / "pretrained" / "toyworld" / "referee"
LADDER_RESULTS = REPO / "pretrained" / "toyworld" / "ladder_results.json"
SETS = ("single", "pair")
FIGURE = "contact_sheets.png"
CONFUSED = "one concept missing, the same one twice, the two swapped or mixed into one object"


def referee_read(folders: list[Path], concepts_root: Path, out: Path, referee_dir: Path = REFEREE) -> dict:
    """The referee reads every image of `folders` (inference.py's): fidelity on the single-concept prompts, the
    kinds on the two-concept prompts (clif/toyworld/scoring.py), one row per image; written to `out`."""
    from .concept_set import load_concepts
    from .referee import Referee

    concepts = load_concepts(concepts_root)
    if not (referee_dir / "referee.safetensors").is_file():
        raise UserError(f"--referee {referee_dir}: no referee.safetensors there")
    for f in folders:
        if not f.is_dir() or not list(f.glob("*.json")):
            raise UserError(f"--images {f}: no images of inference.py there")
    referee = Referee.load(referee_dir)
    reads, prompts, files = [], [], []
    for f in folders:
        imgs, p, names = read_generated(f)
        reads += referee.read(imgs)
        prompts += p
        files += [str(f / n) for n in names]
    scores = score_images(reads, prompts, concepts)
    if len(scores["rows"]) != len(files):
        raise UserError("a prompt names no concept of the set (the referee scores one- and two-concept prompts)")
    for row, f in zip(scores["rows"], files):
        row["image"] = f
    atomic_write_json(out, scores)
    return scores


def _metrics(demo: Path) -> dict:
    path = demo / "eval" / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: run the demo (bash scripts/demo.sh) first")
    return json.loads(path.read_text())


def summary_lines(demo: Path) -> list[str]:
    """Five lines, every number read from the demo's files: where the contact sheets are, the referee's
    fidelity on single-concept images, its kinds on pair images (and what the ladder found on this pair), and
    evaluate.py's metrics."""
    path = demo / "referee.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: run the demo (bash scripts/demo.sh) first")
    ref, ev = json.loads(path.read_text()), _metrics(demo)
    sheets = ", ".join(str(demo / f"images-{s}" / "contact_sheet.png") for s in SETS)
    hits = sum(bool(r.get("faithful")) for r in ref["rows"])
    kinds = ", ".join(f"{k} {ref[f'pair_{k}']:.2f}" for k in KINDS[1:] if ref[f"pair_{k}"] > 0) or "none"
    shown = {s: ", ".join(f"{k} {v:.2f}" for k, v in ev[s]["summary"].items() if _shown(k, v)) for s in SETS}
    scores = "; ".join(f"{s}: {v}" for s, v in shown.items())
    return [
        f"contact sheets: {demo / FIGURE} (the referee's reading under each image); {sheets}",
        f"referee, single-concept images: fidelity {ref['fidelity']:.2f} ({hits} of {ref['n_single']} show exactly "
        + "the concept asked for, alone)",
        f"referee, pair images: correct {ref['pair_correct']:.2f}, confused {ref['oracle_confusion']:.2f} ({kinds}) "
        + f"of {ref['n_pair']}; confused = {CONFUSED}",
        "pair confusion is what CLIF sets out to reduce. " + _ladder_line(demo),
        f"evaluate.py with the world's CLIP: {scores} ({demo / 'eval' / 'metrics.md'})",
    ]


def _shown(key: str, value) -> bool:
    keys = ("text_alignment", "image_alignment", "attendance", "confusion_rate")
    return key in keys and isinstance(value, (int, float))


def _ladder_line(demo: Path) -> str:
    """What the ladder (more seeds, longer training) found on the demo's pair, when that pair is one of its rungs:
    read from the committed results."""
    from .concept_set import load_concepts
    from .ladder import load_rungs

    mine = {o.identity() for o in load_concepts(demo / "concepts").values()}
    rung = next((r for r, objs in load_rungs().items() if {o.identity() for o in objs.values()} == mine), None)
    if rung is None or not LADDER_RESULTS.is_file():
        return "This pair is not a rung of the toy-world ladder: nothing to compare with."
    res = json.loads(LADDER_RESULTS.read_text())
    table = res["rungs"].get(rung, {}).get("table", {})
    got = [
        f"{name} {table[m]['oracle_confusion'][0]:.2f}"
        for m, name in (("clif", "CLIF"), ("ti_lora", "TI+LoRA"))
        if m in table
    ]
    if not got:
        return f"The ladder has no table for rung {rung!r}."
    verdict = res.get("decision", {}).get("clif", {}).get("text", "no verdict")
    steps = res.get("steps", {})
    trained = ", ".join(f"{k} {steps[k]}" for k in ("clif", "ti", "lora") if k in steps)
    return (
        f"On this pair the ladder ({len(res['seeds'])} seeds; steps {trained}) measured confused "
        f"{' vs '.join(got)}; its verdict on CLIF: {verdict}."
    )


def contact_figure(demo: Path, path: Path, per_prompt: int = 4) -> Path:
    """The single- and pair-prompt images, one row per prompt, each titled with what the referee read
    (matplotlib; written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    ref = json.loads((demo / "referee.json").read_text())
    by_prompt: dict[str, list[dict]] = {}
    for row in ref["rows"]:
        by_prompt.setdefault(row["prompt"], []).append(row)
    prompts = list(by_prompt)
    cols = min(per_prompt, max(len(v) for v in by_prompt.values()))
    fig, axes = plt.subplots(len(prompts), cols, figsize=(1.0 * cols + 2.6, 1.12 * len(prompts) + 0.5), squeeze=False)
    for r, prompt in enumerate(prompts):
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            rows = by_prompt[prompt]
            if k < len(rows):
                row = rows[k]
                ax.imshow(Image.open(row["image"]).convert("RGB"), interpolation="nearest")
                ok = row.get("faithful", row.get("kind") == "correct")
                label = ("faithful" if ok else "not faithful") if "faithful" in row else row["kind"]
                ax.set_title(label, fontsize=7, color="green" if ok else "firebrick")
            if k == 0:
                ax.set_ylabel(
                    prompt.replace(" on the left ", "\non the left\n"), rotation=0, ha="right", va="center", fontsize=7
                )
    fig.suptitle("Toy-world demo: generated images and the referee's reading", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def summary(demo: Path, figure: Path | None = None) -> list[str]:
    """The figure (in the demo folder, and copied to `figure` when given), then the five lines."""
    lines = summary_lines(demo)
    contact_figure(demo, demo / FIGURE)
    if figure is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo / FIGURE, figure)
    return lines
