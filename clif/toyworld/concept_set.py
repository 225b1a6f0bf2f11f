"""`python -m clif.toyworld concepts`: a toy-world concept set a user can train on, from a rung of the ladder or
from --concept flags. Beside the set (concepts.json, images, masks, common-concept negatives) it writes what the
referee needs to judge the images generated from it: `toyworld.json` (each concept's class, colour and mark) and
the prompt templates the referee can score (`prompts_single.txt`, `prompts_pair.txt`, for inference.py
--prompt_set)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from clif.cli import image_size, non_negative, positive
from clif.errors import UserError

from .ladder import (
    FIELDS,
    PAIR_PROMPTS,
    SINGLE_PROMPTS,
    add_rungs_file_arg,
    check_concepts,
    select_rungs,
    write_concept_set,
)
from .world import Obj

ABOUT = "toyworld.json"
TEMPLATES = {"single": SINGLE_PROMPTS, "pair": PAIR_PROMPTS}
SPEC_ORDER = ("color", "class", "mark", "mark_color")  # --concept NAME=COLOR,CLASS[,MARK,MARK_COLOR]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="The concept set's folder (must not exist yet).")
    p.add_argument(
        "--rung",
        default=None,
        help="A rung of --rungs_file (e.g. distinct: a red ball and a blue box); or give --concept twice or more.",
    )
    add_rungs_file_arg(p)
    p.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="NAME=COLOR,CLASS[,MARK,MARK_COLOR]",
        help="A concept instead of --rung, e.g. redball=red,ball or yball=yellow,ball,band,purple (repeat it).",
    )
    p.add_argument(
        "--images", type=positive(int), default=None, help="Training renders per concept (default: the rung's, else 5)."
    )
    p.add_argument("--common", type=positive(int), default=8, help="Common-concept negatives per class (stage 1).")
    p.add_argument("--size", type=image_size(), default=32, help="Render size in pixels (the pretrained base's: 32).")
    p.add_argument("--seed", type=non_negative(int), default=0, help="Seed of the renders.")


def concepts_from_args(args) -> dict[str, Obj]:
    """The concepts the flags ask for, every mistake a UserError before anything is written."""
    if bool(args.rung) == bool(args.concept):
        raise UserError("give either --rung or --concept (twice or more)")
    if args.rung:
        rungs = select_rungs(args.rungs_file, [args.rung], "--rung")
        spec = {
            name: {"class": o.cls, "color": o.color, "mark": o.pattern, "mark_color": o.pattern_color}
            | ({"images": rungs[args.rung].images[name]} if args.images is None else {})
            for name, o in rungs[args.rung].items()
        }
    else:
        spec = {}
        for text in args.concept:
            name, _, values = text.partition("=")
            parts = values.split(",") if values else []
            if not 2 <= len(parts) <= 4 or name in spec:
                why = "twice" if name in spec else "is not NAME=COLOR,CLASS[,MARK,MARK_COLOR]"
                raise UserError(f"--concept {text!r} {why}")
            spec[name] = dict(zip(SPEC_ORDER, parts))
    for name in spec:
        if args.images is not None:
            spec[name]["images"] = args.images
    return check_concepts(spec, f"--rung {args.rung!r}" if args.rung else "--concept")


def run(args) -> Path:
    concepts = concepts_from_args(args)
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} already exists; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # written aside, then renamed: a set is there whole or not at all
        write_concept_set(tmp, concepts, args.size, n_common=args.common, seed=args.seed)
        about = {
            n: {f: getattr(o, a) for f, a in zip(FIELDS, ("cls", "color", "pattern", "pattern_color"))}
            for n, o in concepts.items()
        }
        (tmp / ABOUT).write_text(json.dumps({"size": args.size, "concepts": about}, indent=2) + "\n")
        for kind, templates in TEMPLATES.items():
            (tmp / f"prompts_{kind}.txt").write_text("\n".join(templates) + "\n")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_concepts(root: Path) -> dict[str, Obj]:
    """The toy-world objects of a set written by `concepts` (its toyworld.json)."""
    f = Path(root) / ABOUT
    if not f.is_file():
        raise UserError(f"{root} has no {ABOUT}: write the set with `python -m clif.toyworld concepts`")
    about = json.loads(f.read_text())["concepts"]
    return {n: Obj(d["class"], d["color"], d["mark"], d["mark_color"]) for n, d in about.items()}
