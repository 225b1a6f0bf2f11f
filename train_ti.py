"""Stage 2 of CLIF: multi-concept textual inversion (only the placeholder token rows train).

Launch with `accelerate launch train_ti.py ...` (see run_train_ti.sh) or call main([...]) in-process.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.logging import get_logger

from clif import cli
from clif.train import training
from clif.train.compiled import training_unet
from clif.train.data import Shard, image_stream
from clif.train.loop import start_loop
from clif.train.stage import install_embeddings, prepare, start_run, write_stage_outputs

PROG = "train_ti.py"
DEFAULT_STEPS = 1500
logger = get_logger(__name__)


def build_parser():
    p = cli.make_parser(PROG, __doc__)
    cli.add_model_args(p)
    cli.add_data_args(p)
    cli.add_stage_arg(
        p, required=False, help="Start from an earlier stage's output (stage 1): its tokens and embeddings."
    )
    cli.add_training_args(p, lr=2e-4, steps=DEFAULT_STEPS)
    cli.add_compile_args(p)
    p.set_defaults(gradient_accumulation_steps=64)  # official code: effective batch 64 (lr 2e-4)
    return p


def main(argv: list[str] | None = None) -> None:
    cli.run_script(PROG, build_parser(), run, argv)


def run(args) -> None:
    # ---- validate everything before the first expensive step; nothing is written until then
    inp = prepare(args)
    model, concepts = inp.model, inp.concepts
    accelerator = start_run(args, "clif_ti")
    device, dtype = accelerator.device, training.frozen_dtype(accelerator)

    # ---- model: frozen weights in half precision on GPU, trainable rows in fp32
    training.place_frozen(model, device, dtype, gradient_checkpointing=args.gradient_checkpointing)
    modules = install_embeddings(inp)
    params = [m.new for m in modules]

    # ---- data: decoded once; micro-batch k of the stream is a pure function of (seed, k)
    shard = Shard.of(accelerator, args.train_batch_size)
    data, cache = image_stream(concepts, args, model.vae, device)
    if cache is not None and not args.validation_prompt:
        model.vae.to("cpu")  # only validation decodes; free the device memory

    lr = training.scaled_lr(args.learning_rate, args, shard.world)
    unet = training_unet(model, torch_compile=args.torch_compile, mode=args.compile_mode, device=device)

    def save(out: Path) -> None:
        # the stage-1 text-encoder LoRA these embeddings were trained with travels along
        write_stage_outputs(out, "ti", inp, modules, args, text_lora=inp.text_lora)

    runner = start_loop(
        args,
        accelerator,
        model,
        groups=[{"params": params, "lr": lr}],
        trainables={f"embedding.{i}": p for i, p in enumerate(params)},
        write_artifacts=save,
        num_samples=data.epoch_length,
        default_steps=DEFAULT_STEPS,
        desc="ti",
        resume=inp.resume_path,
        stats=lambda n: {"samples_per_concept": data.samples_per_concept(n)},
    )
    logger.info(
        f"{len(concepts)} concepts, {len(data)} images, {runner.max_steps} steps (from {runner.step}), global batch "
        f"{shard.global_batch} x {args.gradient_accumulation_steps} accumulation, {model.family}, {device}, {dtype}"
    )

    # ---- loop: micro-batch k of the stream, its denoising loss
    runner.train(
        lambda k: training.micro_batch_loss(
            model, data, cache, runner.noise, shard, k, dtype=dtype, noise_offset=args.noise_offset, unet=unet
        )
    )
    runner.close()
    logger.info(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
