"""`python -m clif.toyworld concepts|pretrain|gate|experiment|compact|readme|confusion-study|referee|summary ...`:
a toy-world concept set, and one command per step of the toy-world study."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def _threads_restored():
    """The commands set this process's torch threads (and the experiment its stages' OMP_NUM_THREADS); an
    in-process caller (the tests) gets its own back afterwards, so later work there keeps its numerics."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def main(argv: list[str] | None = None) -> None:
    with _threads_restored():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    from clif.cli import Parser, user_errors

    from . import concept_set, confusion_study, experiment, gate, pretrain

    p = Parser(prog="python -m clif.toyworld", description=__doc__)  # its sub-commands' too: one-line errors
    sub = p.add_subparsers(dest="cmd", required=True)
    concept_set.add_args(
        sub.add_parser(
            "concepts",
            help="Write a toy-world concept set (images, masks, common-concept negatives) and the prompt "
            "templates its referee scores.",
        )
    )
    pretrain.add_args(sub.add_parser("pretrain", help="Pretrain the world's CLIP, VAE and UNet."))
    gate.add_args(
        sub.add_parser("gate", help="Train the referee (if needed) and measure the base's renderability gate.")
    )
    experiment.add_args(sub.add_parser("experiment", help="CLIF vs TI+LoRA vs TI on a ladder of look-alike pairs."))
    c = sub.add_parser(
        "compact",
        help="Rewrite a world's float32 weight files as float16 and store the CLIP text tower once "
        "(what is committed).",
    )
    c.add_argument("folder", help="The world folder (pretrain --out).")
    r = sub.add_parser(
        "readme", help="Regenerate docs/toyworld.md's tables and the README's headline from a committed results JSON."
    )
    r.add_argument("--results", default="pretrained/toyworld/ladder_results.json", help="experiment's results.json")
    r.add_argument("--readme", default="docs/toyworld.md", help="The document with the generated block to replace.")
    r.add_argument(
        "--headline",
        default=None,
        help="The document with the block's headline ('' for none; default: README.md for the composition block, "
        "none for the ladder, whose short form stands in docs/toyworld.md).",
    )
    r.add_argument(
        "--block",
        default="results",
        choices=["results", "composition"],
        help="Which generated block: the ladder ('results') or the multi-concept options ('composition').",
    )
    confusion_study.add_args(
        sub.add_parser(
            "confusion-study",
            help="Is evaluate.py's confusion decision right? Tuned and checked against the referee, rung by rung "
            "(= scripts/confusion_metric_study.py).",
        )
    )
    f = sub.add_parser("referee", help="The referee reads inference.py's images of a toy-world concept set.")
    f.add_argument("--images", nargs="+", required=True, help="inference.py output folders.")
    f.add_argument("--concepts", required=True, help="The concept set (written by `concepts`).")
    f.add_argument("--out", required=True, help="JSON of the reading: fidelity, pair kinds, one row per image.")
    f.add_argument("--referee", default=None, help="Referee folder (default: pretrained/toyworld/referee).")
    s = sub.add_parser("summary", help="The demo's five-line summary and contact-sheet figure, from its folder.")
    s.add_argument("demo", help="The demo's folder (scripts/demo.sh: outputs/demo).")
    s.add_argument(
        "--figure",
        default=None,
        help="Also copy the figure here (the README's: assets/demo_contact_sheet.png).",
    )
    args = p.parse_args(argv)
    with user_errors(p.prog):
        _dispatch(args)


def _dispatch(args) -> None:
    from . import confusion_study, experiment, gate, pretrain

    if args.cmd == "concepts":
        from .concept_set import run

        print(f"{run(args)}: concept set written (concepts.json, images/, masks/, common/, prompts_*.txt)")
    elif args.cmd in ("referee", "summary"):
        from pathlib import Path

        from . import demo

        if args.cmd == "referee":
            r = demo.referee_read(
                [Path(f) for f in args.images],
                Path(args.concepts),
                Path(args.out),
                Path(args.referee) if args.referee else demo.REFEREE,
            )
            print(
                f"{args.out}: fidelity {r['fidelity']:.2f} ({r['n_single']} images), confused "
                f"{r['oracle_confusion']:.2f} ({r['n_pair']} pair images)"
            )
        else:
            print("\n".join(demo.summary(Path(args.demo), Path(args.figure) if args.figure else None)))
    elif args.cmd == "pretrain":
        print(pretrain.run(args))
    elif args.cmd == "compact":
        from pathlib import Path

        from .models import share_text_tower, to_fp16_files

        print(f"{to_fp16_files(args.folder)} files rewritten as float16")
        if share_text_tower(Path(args.folder)):
            print("paired_clip/ now reads its text tower from text_encoder/")
    elif args.cmd == "readme":
        from pathlib import Path

        from .report import update_readme

        head = args.headline if args.headline is not None else ("README.md" if args.block == "composition" else "")
        update_readme(Path(args.results), Path(args.readme), Path(head) if head else None, args.block)
        print(f"{args.readme}, {head or 'no headline'}: toy-world tables regenerated from {args.results}")
    elif args.cmd == "confusion-study":
        confusion_study.run(args)
    elif args.cmd == "gate":
        gate.run(args)
    else:
        torch.set_num_threads(1)  # the stages run as subprocesses; this process only scores
        experiment.run(args)


if __name__ == "__main__":
    main()
