"""Evaluate generated images: CLIP text alignment (CLIPScore), image alignment, and CLIF's confusion metric.

Text/image alignment follow Custom Diffusion (open_clip ViT-B-32, OpenAI weights): CLIPScore = 2.5 * max(cos, 0)
between image and prompt with each placeholder token replaced by its class word; image alignment = mean cosine
of each generated image against all reference images of each concept its prompt names. Confusion (two-concept
prompts): instances found by an open-vocabulary detector (or the image halves for left/right prompts) are matched
to the concepts' references; see README "Evaluation" for the exact definition. With a detector, also MuDI's
Detect-and-Compare (D&C, clif/eval/dc.py); `--protocol customconcept101` fixes Custom Diffusion's settings
(clif/eval/protocols.py); `--pairs` reports the look-alike pairs set (clif/eval/lookalikes.py).
"""

from __future__ import annotations

from pathlib import Path

from clif import cli
from clif.concepts import load_concept_set
from clif.eval import backbones, dc, kinds, lookalikes, protocols, sources
from clif.eval.evaluation import (
    References,
    per_prompt,
    read_folder,
    score_folder,
    summarize,
    without_confusion,
)
from clif.eval.figures import pair_bars
from clif.eval.report import write_report
from clif.generate import auto_device_dtype
from clif.outputs.outdir import check_output_dir, lock_dir

PROG = "evaluate.py"
MODEL_FLAGS = ("clip_model", "dino", "detector", "dc_model")


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
        "--concepts",
        default=None,
        help="The concept set (folder or its concepts.json): references, class words. Required unless --pairs "
        "with --dreambench gives the concepts.",
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
        "--confusion_decision",
        choices=["kinds", "margin"],
        default="kinds",
        help="What 'confused' means: kinds (clif/eval/kinds.py; the kind is reported too) or the earlier fixed-margin "
        "rule (always reported as confused_margin).",
    )
    p.add_argument(
        "--confusion_margin",
        type=cli.non_negative(float),
        default=0.02,
        help="The margin rule's margin: an instance must be this much more similar to one concept than the other.",
    )
    p.add_argument(
        "--batch_size", type=cli.positive(int), default=32, help="Images per forward pass (no effect on results)."
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        choices=["clip", "confusion", "dc"],
        default=None,
        help="What to report: clip (text/image alignment, and DINO with --dino; always on), confusion (CLIF's), "
        "dc (MuDI's Detect-and-Compare; needs a detector). Default: clip confusion, plus dc when --detector "
        "is not 'none'.",
    )
    p.add_argument(
        "--dc_model",
        default=dc.DEFAULT_MODEL,
        help="D&C features: a transformers DINOv2 model id or folder (mean of the last hidden state, as MuDI), or "
        "'dreamsim' (MuDI's default; needs the dreamsim package).",
    )
    p.add_argument(
        "--dc_threshold",
        type=cli.number(float, 0.0, 1.0),
        default=dc.DEFAULT_THRESHOLD,
        help="D&C's detector score threshold (MuDI's demo: 0.4); every box above it counts, no NMS.",
    )
    p.add_argument(
        "--protocol",
        choices=sorted(protocols.PROTOCOLS),
        default=None,
        help="customconcept101: Custom Diffusion's evaluation exactly (CLIP ViT-B/32 OpenAI, no caption "
        "prefix, 2.5 x max(cos, 0), their CLIP and DINO ViT-S/16 image transforms); see README.",
    )
    p.add_argument(
        "--pairs",
        default=None,
        help="A look-alike pairs set: 'dreambench' (dataset/lookalikes_dreambench.json) or a JSON file of that "
        "form. The per-pair report marks its pairs and lists those without images.",
    )
    p.add_argument(
        "--dreambench",
        default=None,
        help="With --pairs: the DreamBench dataset folder (<subject>/*.jpg); the concepts (tokens <subject>) "
        "are then built from the pairs set, no --concepts needed.",
    )
    return p


def check_new_flags(args) -> tuple[set[str], dict | None, lookalikes.LookalikeSet | None]:
    """The metrics to compute, the protocol's settings and the pairs set; UserError before anything is loaded."""
    use_detector = args.detector != "none"
    if args.metrics is None:
        metrics = {"clip", "confusion"} | ({"dc"} if use_detector else set())
    else:
        metrics = {"clip", *args.metrics}
        if "dc" in metrics and not use_detector:
            raise cli.UserError("--metrics dc needs a detector (--detector is 'none')")
    defaults = {k: build_parser().get_default(k) for k in ("clip_model", "clip_pretrained", "dino")}
    proto = protocols.resolve(args.protocol, args, defaults)
    if args.dreambench and not args.pairs:
        raise cli.UserError("--dreambench needs --pairs (it holds the references of the pairs' subjects)")
    if args.concepts and args.dreambench:
        raise cli.UserError("give either --concepts or --pairs with --dreambench, not both")
    if not args.concepts and not args.dreambench:
        raise cli.UserError("--concepts is required (or --pairs with --dreambench)")
    lset = lookalikes.load_pairs(args.pairs) if args.pairs else None
    if args.dreambench:
        cli_root = Path(args.dreambench)
        if not cli_root.is_dir():
            raise cli.UserError(f"--dreambench {cli_root}: not a folder")
        if not lookalikes.present_subjects(lset, cli_root):
            raise cli.UserError(f"--dreambench {cli_root} holds none of the subjects of --pairs {args.pairs}")
    return metrics, proto, lset


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli.user_errors(PROG):
        return run(args)


def run(args) -> dict:
    labels = args.labels or [Path(d).name for d in args.images]
    if len(labels) != len(args.images) or len(set(labels)) != len(labels):
        raise cli.UserError("--labels needs one distinct name per --images folder")
    metrics, proto, lset = check_new_flags(args)
    if proto is not None:
        args.clip_model, args.clip_pretrained, args.dino = proto["clip_model"], proto["clip_pretrained"], proto["dino"]
    if args.concepts:
        root = Path(args.concepts)
        set_root = root.parent if root.name == "concepts.json" else root
        concepts = load_concept_set(set_root)
    else:
        root = set_root = Path(args.dreambench)
        concepts = lookalikes.present_concepts(lset, root)
    folders = {label: read_folder(d) for label, d in zip(labels, args.images)}
    out = Path(args.output_dir)
    inputs = [("--images", d) for d in args.images] + [("--concepts" if args.concepts else "--dreambench", root)]
    check_output_dir(out, overwrite=args.overwrite, deletes=False, inputs=inputs)
    # every model named, before any loads: a mistyped path or a model that cannot load offline is named
    sources.check(args, metrics, {k: build_parser().get_default(k) for k in MODEL_FLAGS})
    dc_model, backbone, dino, detector = backbones.open_models(args, metrics, proto, auto_device_dtype("auto")[0])

    refs = References.of(concepts, set_root, args.batch_size, backbone=backbone, dino=dino, dc_model=dc_model)
    settings = {
        "metrics": sorted(metrics),
        "protocol": {"name": args.protocol, **proto} if proto else None,
        "clip_model": args.clip_model,
        "dino": args.dino,
        "dc": {"model": args.dc_model, "threshold": args.dc_threshold} if dc_model is not None else None,
        "pairs": str(lset.source) if lset else None,
        "confusion": {
            "decision": args.confusion_decision,
            "margin": args.confusion_margin,
            "kind_settings": kinds.SETTINGS.as_dict(),
            "common_classes": sorted(refs.common),
        },
    }
    results = {}
    for label, items in folders.items():
        rows = score_folder(
            items,
            concepts,
            refs.clip,
            backbone,
            batch_size=args.batch_size,
            margin=args.confusion_margin,
            common_refs=refs.common,
            decision=args.confusion_decision,
            detector=detector,
            dino=dino,
            dino_refs=refs.dino,
        )
        if dc_model is not None:
            dc.add_to_rows(
                rows, items, concepts, refs.dc, lambda ims: dc_model(ims, args.batch_size), detector, args.dc_threshold
            )
        summary, prompts = summarize(rows), per_prompt(rows)
        summary.update(dc.dc_stats(rows))
        for p in prompts:
            p.update(dc.dc_stats([r for r in rows if r["prompt"] == p["prompt"]]))
        pairs = dc.per_pair(rows)
        if lset is not None:
            pairs = lookalikes.mark_pairs(pairs, lset)
        if "confusion" not in metrics:
            rows, prompts, pairs = (list(map(without_confusion, x)) for x in (rows, prompts, pairs))
            summary = without_confusion(summary)
        results[label] = {
            "summary": summary,
            "per_prompt": prompts,
            "per_pair": pairs,
            "rows": rows,
            "settings": settings,
        }
    lock_dir(out)  # held until the run ends: a second run into this folder is refused
    write_report(out, results)
    pair_bars({label: r["per_pair"] for label, r in results.items()}, out / "pairs.png")
    print((out / "metrics.md").read_text().split("\n\nPer prompt")[0])
    return results


if __name__ == "__main__":
    main()
