"""Stage 3 of CLIF: LoRA on the UNet attention layers trained jointly with the concept token embeddings.

Starts from a stage-2 output (--stage_dir): tokens and embeddings come from its manifest.
Launch with `accelerate launch train_lora.py ...` (see run_train_lora.sh) or call main([...]) in-process.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.logging import get_logger

from clif import cli, full_text, lora
from clif.errors import UserError
from clif.masks import add_segmenter_args
from clif.train import prior, training
from clif.train.compiled import training_unet
from clif.train.data import Shard, image_stream
from clif.train.loop import start_loop
from clif.train.segmix import SegMix
from clif.train.stage import current_rows, lora_trainables, prepare, start_run, write_stage_outputs

PROG = "train_lora.py"
DEFAULT_STEPS = 1000
logger = get_logger(__name__)


def build_parser():
    p = cli.make_parser(PROG, __doc__)
    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_stage_arg(p, required=True, help="Stage-2 output: tokens and starting embeddings.")
    cli.add_training_args(p, lr=2e-4, steps=DEFAULT_STEPS)
    cli.add_compile_args(p)
    p.set_defaults(gradient_accumulation_steps=64)  # official code: effective batch 64 (lr 2e-4, rank 16, alpha = rank)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=cli.positive(int), default=16, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=cli.positive(float), default=None, help="LoRA alpha (default: = rank).")
    dropout = cli.number(float, 0, 1, hi_open=True)
    g.add_argument("--lora_dropout", type=dropout, default=0.0, help="Dropout on the LoRA input.")
    g.add_argument(
        "--lora_targets",
        default=",".join(lora.DEFAULT_UNET_TARGETS),
        help="Comma list of UNet layer names (suffixes) that get LoRA.",
    )
    g.add_argument(
        "--train_text_encoder_lora",
        action="store_true",
        help="Also train a LoRA on the text encoders' attention (q,k,v,out projections).",
    )
    g.add_argument(
        "--text_encoder_lr",
        type=cli.positive(float),
        default=None,
        help="Learning rate of the text-encoder LoRA (default: --learning_rate).",
    )
    g.add_argument(
        "--embedding_learning_rate",
        type=cli.non_negative(float),
        default=None,
        help="Learning rate of the concept token rows (default: --learning_rate, official code); 0 freezes them.",
    )
    g.add_argument("--snr_gamma", type=cli.positive(float), default=None, help="Min-SNR loss weighting (5.0 is usual).")
    cli.harmless(
        g.add_argument(
            "--export_kohya",
            action="store_true",
            help="Also write <name>_kohya.safetensors for A1111/ComfyUI (real alpha, bundled embeddings).",
        )
    )
    g = p.add_argument_group("Seg-Mix (MuDI): two-concept collages, loss masked to the pasted subjects")
    g.add_argument(
        "--segmix_prob",
        type=cli.number(float, 0, 1),
        default=0.0,
        help="Share of the samples that are a collage of the sample's concept and another one, side by side, "
        "captioned 'a photo of a <A> on the left and a <B> on the right' (0 = off; needs 2+ concepts and masks).",
    )
    g.add_argument(
        "--segmix_collages",
        type=cli.positive(int),
        default=8,
        help="Collages per training image in the run's pool (built from --seed; cached with --cache_latents).",
    )
    g.add_argument(
        "--segmix_background_weight",
        type=cli.number(float, 0, 1),
        default=0.0,
        help="Weight of a collage's background in the loss, its pasted subjects weighing 1 (MuDI's soft_alpha): "
        "0 = the loss masked to the subjects, 1 = no mask.",
    )
    add_segmenter_args(g, cache_help="Cache of the masks the segmenter computes (images without masks/<name>/).")
    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true", help="Add the class-image loss.")
    g.add_argument("--class_data_dir", default=None, help="Class images; missing ones are generated and cached here.")
    g.add_argument("--class_prompt", default=None, help="Caption of the class images, e.g. 'a photo of a dog'.")
    g.add_argument("--num_class_images", type=cli.positive(int), default=100, help="Class images to use.")
    g.add_argument("--prior_loss_weight", type=cli.non_negative(float), default=1.0, help="Weight of the class loss.")
    return p


def main(argv: list[str] | None = None) -> None:
    cli.run_script(PROG, build_parser(), run, argv)


def check_args(args) -> None:
    if args.with_prior_preservation and not (args.class_prompt and args.class_data_dir):
        raise UserError("--with_prior_preservation needs --class_prompt and --class_data_dir")
    if args.embedding_learning_rate is None:  # recorded resolved in the manifest
        args.embedding_learning_rate = args.learning_rate
    if not [t for t in args.lora_targets.split(",") if t.strip()]:
        raise UserError("--lora_targets names no layer (e.g. to_q,to_k,to_v,to_out.0)")


def run(args) -> None:
    # ---- validate everything before the first expensive step; nothing is written until then
    check_args(args)
    mix = SegMix(args)  # --segmix_prob: two concepts or more, and a mask of every image, checked with the set
    inp = prepare(args, stage_required=True, check=mix.check)
    model, concepts = inp.model, inp.concepts
    if args.export_kohya:
        full_text.check_exportable(args.stage_dir, model, "--export_kohya")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    lora.check_targets(model.unet, targets, "UNet")
    alpha = args.lora_alpha or float(args.rank)
    accelerator = start_run(args, "clif_lora")
    device, dtype = accelerator.device, training.frozen_dtype(accelerator)
    training.place_frozen(model, device, dtype, gradient_checkpointing=args.gradient_checkpointing)

    if args.with_prior_preservation:  # before any adapter: class images come from the untouched base model
        prior.ensure_class_images(args, model, accelerator, dtype=dtype)

    # ---- trainables: LoRA (fp32) on the frozen half-precision UNet (+ text encoders), concept rows (fp32)
    groups, trainables, modules = lora_trainables(
        inp,
        args,
        lr=training.scaled_lr(args.learning_rate, args, accelerator.num_processes),
        alpha=alpha,
        targets=targets,
    )

    # ---- data (+ class images), latent caches
    shard = Shard.of(accelerator, args.train_batch_size)
    data, cache = mix.wrap(*image_stream(concepts, args, model.vae, device), concepts, model.vae, device)
    prior_term = prior.PriorPreservation(args, model, device, shard) if args.with_prior_preservation else None
    if args.cache_latents and not args.validation_prompt:
        model.vae.to("cpu")
    # nothing on the text side trains: encode each caption once
    text_cache = (
        training.TextCache(model) if not args.embedding_learning_rate and not args.train_text_encoder_lora else None
    )

    text_lora = args.train_text_encoder_lora or inp.text_lora

    def kohya(out: Path) -> None:
        name = f"{Path(args.output_dir).name}_kohya.safetensors"
        lora.export_kohya(out / name, model, alpha, text_lora, concepts, current_rows(inp, modules))

    def save(out: Path) -> None:
        extra = kohya if args.export_kohya else None
        write_stage_outputs(out, "lora", inp, modules, args, text_lora=text_lora, unet_lora=True, extra=extra)

    runner = start_loop(
        args,
        accelerator,
        model,
        groups=groups,
        trainables=trainables,
        write_artifacts=save,
        num_samples=data.epoch_length,
        default_steps=DEFAULT_STEPS,
        desc="lora",
        resume=inp.resume_path,
        stats=lambda n: {"samples_per_concept": data.samples_per_concept(n), **mix.stats(data, n)},
        extra_noise=[prior_term.noise] if prior_term else [],
    )
    logger.info(
        f"{len(concepts)} concepts, LoRA rank {args.rank} alpha {alpha} on {targets}, {runner.max_steps} steps "
        f"(from {runner.step}), {model.family}, {device}, frozen {dtype}"
    )

    # ---- loop: the denoising loss of micro-batch k (+ the class images' at the same k)
    unet = training_unet(model, torch_compile=args.torch_compile, mode=args.compile_mode, device=device)
    loss_kwargs = {"dtype": dtype, "noise_offset": args.noise_offset, "snr_gamma": args.snr_gamma, "unet": unet}

    def micro_step(k: int):
        loss = training.micro_batch_loss(
            model, data, cache, runner.noise, shard, k, text_cache=text_cache, **loss_kwargs
        )
        if prior_term is not None:
            loss = loss + prior_term.loss(model, k, text_cache=text_cache, **loss_kwargs)
        return loss

    runner.train(micro_step)
    runner.close()
    logger.info(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
