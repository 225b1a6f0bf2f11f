"""Stage 1 of CLIF: contrastive fine-tuning of the concept tokens against the frozen matching CLIP image tower.

Image-caption pairs come from Global / Region / Mix augmentations of the concept images (clif/augment.py).
Text features = the diffusion text encoder's pooled output through the paired CLIP's text projection; image
features = the paired CLIP's image tower (frozen, computed once); InfoNCE with multi-positive targets,
features gathered across processes. Launch with `accelerate launch train_clif.py ...` (see run_train_clif.sh).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.logging import get_logger

from clif import cli, lora, training
from clif.augment import KINDS, PairBuilder, common_images
from clif.contrastive import TextSide, confusion, generate_common_images, save_confusion
from clif.data import Shard
from clif.loop import StepRunner
from clif.losses import clip_loss, gather_features
from clif.masks import DEFAULT_SEGMENTER, Segmenter
from clif.paired import PairedCLIP, clip_image_size, default_pair
from clif.stage import install_embeddings, prepare, start_run, write_stage_outputs

PROG = "train_clif.py"
DEFAULT_STEPS = 500
logger = get_logger(__name__)


def build_parser():
    p = cli.make_parser(PROG, __doc__)
    cli.add_model_args(p)
    cli.add_data_args(p, images=False)
    g = p.add_argument_group("CLIF pairs and paired CLIP")
    g.add_argument(
        "--clip_model",
        default=None,
        help="CLIP paired with text_encoder (default: <model>/paired_clip "
        "if present, else the public CLIP of that width, e.g. openai/clip-vit-large-patch14).",
    )
    g.add_argument(
        "--clip_model_2",
        default=None,
        help="SDXL: CLIP paired with text_encoder_2 (default: "
        "<model>/paired_clip_2, else laion/CLIP-ViT-bigG-14-laion2B-39B-b160k).",
    )
    g.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="CLIPSeg model for concepts/parts without masks.")
    g.add_argument(
        "--cache_dir",
        default=str(Path.home() / ".cache" / "clif"),
        help="Cache of computed masks and generated common-concept images.",
    )
    g.add_argument(
        "--common_words",
        default="",
        help="Comma list of common concepts (e.g. 'chef,dog,car') used as "
        "negatives; images from <data>/common/<word>/ or generated with the base model.",
    )
    g.add_argument("--num_common_images", type=cli.positive(int), default=4, help="Generated images per common word.")
    g.add_argument("--num_pairs", type=cli.positive(int), default=2000, help="Augmented training pairs.")
    for kind, default in zip(KINDS, (0.4, 0.2, 0.4)):
        g.add_argument(
            f"--{kind}_ratio",
            type=cli.non_negative(float),
            default=default,
            help=f"Share of {kind.capitalize()} pairs (Region is skipped with a warning without parts).",
        )
    g.add_argument(
        "--train_text_encoder",
        choices=["none", "lora"],
        default="none",
        help="'lora': also train a LoRA on the text encoders' attention (saved as pytorch_lora_weights."
        "safetensors; later stages load it, keep it and pass it on).",
    )
    g.add_argument("--text_encoder_rank", type=cli.positive(int), default=8, help="Rank (= alpha) of that LoRA.")
    g.add_argument("--text_encoder_lr", type=cli.positive(float), default=1e-4, help="Learning rate of that LoRA.")
    g.add_argument(
        "--num_views",
        type=cli.positive(int),
        default=8,
        help="Held-out views per concept for the before/after confusion matrix.",
    )
    cli.add_training_args(p, lr=1e-3, steps=DEFAULT_STEPS, validation=False)
    p.set_defaults(train_batch_size=32, gradient_accumulation_steps=1)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with cli.user_errors(PROG):
        run(args)


def run(args) -> None:
    # ---- validate before the first expensive step; nothing is written until then
    inp = prepare(args, text_only=True)
    model, concepts = inp.model, inp.concepts
    names = [args.clip_model, args.clip_model_2][: len(model.text_encoders)]
    names = [
        n or default_pair(args.pretrained_model_name_or_path, i, e.config.hidden_size)
        for i, (n, e) in enumerate(zip(names, model.text_encoders))
    ]
    ratios = {k: getattr(args, f"{k}_ratio") for k in KINDS}
    skip_region = ratios["region"] > 0 and not any(c.parts for c in concepts)
    if skip_region:
        ratios["region"] = 0.0
    words = [w.strip() for w in args.common_words.split(",") if w.strip()]
    cache_dir = Path(args.cache_dir)

    # masks (user or segmented, cached) and the pair counts are checked here too, before anything is written
    size = clip_image_size(names[0])
    builder = PairBuilder(concepts, size=size, segmenter=Segmenter(args.segmenter, cache_dir / "masks"))
    builder.counts(args.num_pairs, ratios)

    accelerator = start_run(args, "clif_contrastive")
    device, dtype = accelerator.device, training.frozen_dtype(accelerator)
    if skip_region:
        logger.warning("no concept has part names ('parts' in concepts.json): Region augmentation skipped")
    for enc in model.text_encoders:
        enc.to(device, dtype)
    paired = [PairedCLIP(n, e, device, dtype) for n, e in zip(names, model.text_encoders)]
    if words and accelerator.is_main_process:
        generate_common_images(
            args.pretrained_model_name_or_path,
            words,
            args.num_common_images,
            cache_dir,
            device=device,
            dtype=dtype,
            seed=args.seed,
            revision=args.revision,
        )
    accelerator.wait_for_everyone()

    # ---- pairs (same seed, same pairs, on every process) and their frozen image features
    builder.add_common(common_images(Path(args.train_data_dir), words, cache_dir))
    pairs = builder.build(args.num_pairs, ratios, args.seed)
    views = builder.views(args.num_views, args.seed + 10_000)
    image_feats = [p.image_features([q.image for q in pairs]) for p in paired]
    view_feats = [p.image_features([v.image for v in views]) for p in paired]
    captions = [q.caption for q in pairs]

    modules = install_embeddings(inp)
    params = [m.new for m in modules]
    trainables = {f"embedding.{i}": p for i, p in enumerate(params)}
    lr = training.scaled_lr(args.learning_rate, args, accelerator.num_processes)
    groups = [{"params": list(params), "lr": lr}]
    if args.train_text_encoder == "lora":
        te = [
            p
            for enc in model.text_encoders
            for p in lora.add_lora(
                enc, rank=args.text_encoder_rank, alpha=args.text_encoder_rank, dropout=0.0, targets=lora.TEXT_TARGETS
            )
        ]
        for i, enc in enumerate(model.text_encoders):
            trainables.update(lora.named_lora_params(enc, f"text_encoder.{i}"))
        groups.append({"params": te, "lr": args.text_encoder_lr})
        params = params + te

    def save(out: Path) -> None:
        write_stage_outputs(out, "clif", inp, modules, args, text_lora=args.train_text_encoder == "lora")

    text = TextSide(model, paired, concepts)
    before = confusion(text, views, view_feats)
    logger.info(
        f"{len(pairs)} pairs ({builder.counts(args.num_pairs, ratios)}), confusion accuracy before "
        f"{before['accuracy']:.3f}"
    )

    shard = Shard.of(accelerator, args.train_batch_size)
    max_steps = training.resolve_steps(args, len(pairs), shard.world, DEFAULT_STEPS)
    optimizer = accelerator.prepare(training.make_optimizer(groups, args))
    noise = training.NoiseSource(
        args.seed, device, shard.global_batch, shard.rank, shard.local
    )  # drives the pair order
    runner = StepRunner(
        args,
        accelerator,
        model,
        params,
        optimizer,
        training.make_lr_scheduler(args, optimizer, max_steps),
        noise,
        trainables,
        save,
        max_steps,
        "clif",
    )
    runner.resume(inp.resume_path)

    # ---- loop: the global batch is drawn once for all processes; each encodes its shard of the captions
    while not runner.done:
        total = 0.0
        for _ in runner.micro_steps():
            idx = torch.randint(len(pairs), (shard.global_batch,), generator=noise.gen, device=noise.device).cpu()
            local = idx[shard.rank * shard.local : (shard.rank + 1) * shard.local]
            batch_caps = [captions[i] for i in idx]
            with accelerator.autocast():
                feats = text.features([captions[i] for i in local])
                loss = sum(
                    clip_loss(gather_features(f, accelerator), img[idx].to(device), batch_caps, p.logit_scale)
                    for f, img, p in zip(feats, image_feats, paired)
                )
            # every process holds the full global loss but only its shard's gradient: scale so the
            # averaged gradients equal those of one process with the whole batch
            runner.backward(loss * shard.world)
            total += loss.detach() / args.gradient_accumulation_steps
        runner.finish(total)
    after = confusion(text, views, view_feats)
    if accelerator.is_main_process:
        save_confusion(Path(args.output_dir), before, after)
    logger.info(f"confusion accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    runner.close()


if __name__ == "__main__":
    main()
