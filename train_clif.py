"""Stage 1 of CLIF: contrastive fine-tuning of the concept tokens against the frozen matching CLIP image tower.

Image-caption pairs come from Global / Region / Mix augmentations of the concept images (clif/contrastive/augment.py).
Text features = the diffusion text encoder's pooled output through the paired CLIP's text projection; image
features = the paired CLIP's image tower (frozen, computed once); InfoNCE with multi-positive targets,
features gathered across processes. Launch with `accelerate launch train_clif.py ...` (see run_train_clif.sh).
"""

from __future__ import annotations

from pathlib import Path

from accelerate.logging import get_logger

from clif import cli, full_text, lora, seeds, validate
from clif.contrastive.augment import KINDS, add_pair_args, builder_from_args
from clif.contrastive.common_concepts import common_images, generate_common_images
from clif.contrastive.confusion import ConfusionProbe
from clif.contrastive.paired import PairedCLIP, clip_image_size, pair_names, pair_sources
from clif.contrastive.step import ContrastiveStep
from clif.contrastive.text_side import TextSide
from clif.masks import Segmenter, add_segmenter_args
from clif.train import training
from clif.train.data import Shard
from clif.train.loop import start_loop
from clif.train.stage import install_embeddings, prepare, start_run, write_stage_outputs

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
    add_segmenter_args(g, cache_help="Cache of computed masks and generated common-concept images.")
    g.add_argument(
        "--common_words",
        default="",
        help="Comma list of common concepts (e.g. 'chef,dog,car') used as "
        "negatives; images from <data>/common/<word>/ or generated with the base model.",
    )
    g.add_argument("--num_common_images", type=cli.positive(int), default=4, help="Generated images per common word.")
    g.add_argument("--num_pairs", type=cli.positive(int), default=4096, help="Augmented training pairs.")
    for kind, default in zip(KINDS, (0.4, 0.2, 0.4)):
        g.add_argument(
            f"--{kind}_ratio",
            type=cli.non_negative(float),
            default=default,
            help=f"Share of {kind.capitalize()} pairs"
            + (" (user part masks, else automatic regions of the concept mask)." if kind == "region" else "."),
        )
    add_pair_args(g)
    g.add_argument(
        "--train_text_encoder",
        choices=["none", "lora", "full"],
        default="none",
        help="'lora': also train a LoRA on the text encoders' attention (saved as pytorch_lora_weights."
        "safetensors); 'full': also train every text-encoder weight but the vocabulary table (saved as "
        "text_encoder*/ folders, which no kohya/A1111 LoRA file can carry). Later stages load either, keep it frozen "
        "and pass it on.",
    )
    g.add_argument("--text_encoder_rank", type=cli.positive(int), default=8, help="Rank (= alpha) of that LoRA.")
    g.add_argument(
        "--text_encoder_lr", type=cli.positive(float), default=1e-4, help="Learning rate of that LoRA or whole encoder."
    )
    g.add_argument(
        "--num_views",
        type=cli.positive(int),
        default=8,
        help="Composed views per concept for the before/after confusion matrices.",
    )
    cli.harmless(
        g.add_argument(
            "--text_chunk_size",
            type=cli.positive(int),
            default=256,
            help="Captions per text-encoder pass: a larger batch is trained gradient-cached in chunks of this size "
            "(same gradient, memory of one chunk).",
        )
    )
    cli.add_training_args(p, lr=1e-4, steps=DEFAULT_STEPS, validation=False)
    # official code: effective batch 2048, weight decay 1e-2, 8-bit AdamW (None = when bitsandbytes and CUDA exist)
    p.set_defaults(train_batch_size=2048, gradient_accumulation_steps=1, adam_weight_decay=1e-2, use_8bit_adam=None)
    return p


def main(argv: list[str] | None = None) -> None:
    cli.run_script(PROG, build_parser(), run, argv)


def run(args) -> None:
    # ---- validate before the first expensive step; nothing is written until then
    args.use_8bit_adam = training.want_8bit_adam(args.use_8bit_adam)  # resolved: the manifest records it
    inp = prepare(args, text_only=True)
    model, concepts = inp.model, inp.concepts
    given = [args.clip_model, args.clip_model_2]
    names = pair_names(args.pretrained_model_name_or_path, given, model.text_encoders)
    validate.check_models(pair_sources(names, given))  # every paired CLIP, before the run dir is written
    ratios = {k: getattr(args, f"{k}_ratio") for k in KINDS}
    words = [w.strip() for w in args.common_words.split(",") if w.strip()]
    cache_dir = Path(args.cache_dir)
    # masks (user, segmented or over-segmented), templates and pair counts are checked here too
    segmenter = Segmenter(args.segmenter, cache_dir / "masks")
    builder = builder_from_args(
        args, concepts, size=clip_image_size(names[0]), segmenter=segmenter, regions=ratios["region"] > 0
    )
    builder.counts(args.num_pairs, ratios)

    accelerator = start_run(args, "clif_contrastive")
    device, dtype = accelerator.device, training.frozen_dtype(accelerator)
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
            seed=seeds.stream(args.seed, "generated"),
            revision=args.revision,
            root=Path(args.train_data_dir),
        )
    accelerator.wait_for_everyone()

    # ---- pairs (same seed, same pairs, on every process) and their frozen image features, computed once
    builder.add_common(common_images(Path(args.train_data_dir), words, cache_dir))
    pairs = builder.build(args.num_pairs, ratios, seeds.stream(args.seed, "augmentation"))
    image_feats = [p.image_features([q.image for q in pairs]) for p in paired]
    captions, keys, n_pairs = [q.caption for q in pairs], [q.key for q in pairs], len(pairs)
    per_concept = builder.samples_per_concept(pairs)  # run_stats.json: the pairs showing each concept
    del pairs  # the composed images are no longer needed: only their features
    probe = ConfusionProbe(builder, paired, args.num_views, seeds.stream(args.seed, "probe"))

    modules = install_embeddings(inp)
    trainables = {f"embedding.{i}": m.new for i, m in enumerate(modules)}
    lr = training.scaled_lr(args.learning_rate, args, accelerator.num_processes)
    groups = [{"params": [m.new for m in modules], "lr": lr}]
    if args.train_text_encoder == "lora":
        rank, init = args.text_encoder_rank, seeds.stream(args.seed, "lora_init")
        te = lora.add_text_loras(model, rank=rank, alpha=rank, dropout=0.0, seed=init)
        trainables.update(lora.text_lora_trainables(model.text_encoders))
        groups.append({"params": te, "lr": args.text_encoder_lr})
    elif args.train_text_encoder == "full":
        whole = full_text.trainable_params(model)
        trainables.update(whole)
        groups.append({"params": list(whole.values()), "lr": args.text_encoder_lr})

    def save(out: Path) -> None:
        kind = args.train_text_encoder
        write_stage_outputs(out, "clif", inp, modules, args, text_lora=kind == "lora", whole_encoder=kind == "full")

    text = TextSide(model, paired, concepts)
    before = probe.measure(text)
    logger.info(f"{n_pairs} pairs ({builder.counts(args.num_pairs, ratios)}), confusion before: {_acc(before)}")

    # ---- loop: the pair order comes from the noise stream; the whole global batch's loss, gradient-cached
    runner = start_loop(
        args,
        accelerator,
        model,
        groups=groups,
        trainables=trainables,
        write_artifacts=save,
        num_samples=n_pairs,
        default_steps=DEFAULT_STEPS,
        desc="clif",
        resume=inp.resume_path,
        stats=lambda n: {"pairs_per_concept": per_concept},
    )
    shard = Shard.of(accelerator, args.train_batch_size)
    step = ContrastiveStep(text, paired, image_feats, captions, keys, shard, accelerator, args.text_chunk_size)
    runner.train(lambda k: step(runner.noise, runner.backward), backward=False)
    after = probe.measure(text)
    if accelerator.is_main_process:
        probe.write(Path(args.output_dir), before, after)
    logger.info(f"confusion before: {_acc(before)}; after: {_acc(after)}")
    runner.close()


def _acc(result: dict[str, dict]) -> str:
    return ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result.items())


if __name__ == "__main__":
    main()
