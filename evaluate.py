"""Evaluate generated images: CLIP text alignment (CLIPScore), image alignment, and CLIF's confusion metric.

Text/image alignment follow Custom Diffusion (open_clip ViT-B-32, OpenAI weights): CLIPScore = 2.5 * max(cos, 0)
between image and prompt with each placeholder token replaced by its class word; image alignment = mean cosine
of each generated image against all reference images of each concept its prompt names. Confusion (two-concept
prompts): instances found by an open-vocabulary detector (or the image halves for left/right prompts) are matched
to the concepts' references; see README "Evaluation" for the exact definition.
"""

from __future__ import annotations

from pathlib import Path

from clif import cli
from clif.concepts import load_concept_set, open_rgb
from clif.eval.evaluation import Detector, Dino, open_backbone, per_prompt, read_folder, score_folder, summarize
from clif.eval.report import write_report
from clif.generate import auto_device_dtype
from clif.outputs.outdir import check_output_dir

PROG = "evaluate.py"


def build_parser():
    p = cli.make_parser(PROG, __doc__)
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="Folder(s) of PNGs with inference.py sidecars (or a prompts.json {file: prompt}).",
    )
    p.add_argument("--labels", nargs="+", default=None, help="A name per --images folder (default: folder names).")
    p.add_argument(
        "--concepts", required=True, help="The concept set (folder or its concepts.json): references, class words."
    )
    p.add_argument("--output_dir", required=True, help="Where metrics.json/.csv/.md and metrics.png go.")
    p.add_argument("--overwrite", action="store_true", help="Replace earlier metrics in --output_dir.")
    p.add_argument(
        "--clip_model",
        default="ViT-B-32",
        help="open_clip model name, hf-hub:org/repo, local-dir:/path, or a transformers CLIPModel folder "
        "(e.g. the toy world's paired_clip/).",
    )
    p.add_argument(
        "--clip_pretrained", default="openai", help="open_clip pretrained tag (ignored for hf-hub:/local-dir:)."
    )
    p.add_argument(
        "--dino", default=None, help="Also DINO image alignment with this model (e.g. facebook/dino-vits16)."
    )
    p.add_argument(
        "--detector",
        default="google/owlv2-base-patch16-ensemble",
        help="Open-vocabulary detector for the confusion metric ('none': image halves for left/right prompts only).",
    )
    p.add_argument("--detector_threshold", type=cli.non_negative(float), default=0.1, help="Detector score threshold.")
    p.add_argument(
        "--confusion_margin",
        type=cli.non_negative(float),
        default=0.02,
        help="An instance must be this much more similar to one concept than the other to count as matched.",
    )
    p.add_argument(
        "--batch_size", type=cli.positive(int), default=32, help="Images per forward pass (no effect on results)."
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli.user_errors(PROG):
        return run(args)


def run(args) -> dict:
    labels = args.labels or [Path(d).name for d in args.images]
    if len(labels) != len(args.images) or len(set(labels)) != len(labels):
        raise cli.UserError("--labels needs one distinct name per --images folder")
    root = Path(args.concepts)
    concepts = load_concept_set(root.parent if root.name == "concepts.json" else root)
    folders = {label: read_folder(d) for label, d in zip(labels, args.images)}
    out = Path(args.output_dir)
    inputs = [("--images", d) for d in args.images] + [("--concepts", root)]
    check_output_dir(out, overwrite=args.overwrite, deletes=False, inputs=inputs)
    device, _ = auto_device_dtype("auto")
    backbone = open_backbone(args.clip_model, args.clip_pretrained, device)
    dino = Dino(args.dino, device) if args.dino else None
    detector = None if args.detector == "none" else Detector(args.detector, device, args.detector_threshold)

    refs, dino_refs = {}, {}
    for c in concepts:
        ims = [open_rgb(p) for p in c.images]
        refs[c.name] = backbone.images(ims, args.batch_size)
        if dino is not None:
            dino_refs[c.name] = dino.images(ims, args.batch_size)
    results = {}
    for label, items in folders.items():
        rows = score_folder(
            items,
            concepts,
            refs,
            backbone,
            batch_size=args.batch_size,
            margin=args.confusion_margin,
            detector=detector,
            dino=dino,
            dino_refs=dino_refs,
        )
        results[label] = {"summary": summarize(rows), "per_prompt": per_prompt(rows), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, results)
    print((out / "metrics.md").read_text().split("\n\nPer prompt")[0])
    return results


if __name__ == "__main__":
    main()
