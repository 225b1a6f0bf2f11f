"""Stage 2 of CLIF: multi-concept textual inversion (only the placeholder token rows train).

Launch with `accelerate launch train_ti.py ...` (see run_train_ti.sh) or call main([...]) in-process.
"""

from __future__ import annotations

import gc
from pathlib import Path


import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from clif import artifacts, checkpoint, cli, training
from clif.data import ConceptImages, LatentCache
from clif.images import render_validation
from clif.stage import install_embeddings, prepare, write_stage_outputs

PROG = "train_ti.py"
DEFAULT_STEPS = 1500
logger = get_logger(__name__)


def build_parser():
    p = cli.make_parser(PROG, __doc__)
    cli.add_model_args(p)
    cli.add_data_args(p)
    p.add_argument("--stage_dir", default=None,
                   help="Start from an earlier stage's output (stage 1): its tokens and embeddings.")
    cli.add_training_args(p, lr=5e-4, steps=DEFAULT_STEPS)
    return p


def parse_args(argv: list[str] | None):
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with cli.user_errors(PROG):
        run(args)


def run(args) -> None:
    # ---- validate everything before the first expensive step; nothing is written until then
    resuming = args.resume_from_checkpoint is not None
    artifacts.check_output_dir(args.output_dir, overwrite=args.overwrite, resuming=resuming)
    resume_path = checkpoint.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    training.check_optimizer_flags(args)
    inp = prepare(args)
    model, concepts = inp.model, inp.concepts

    accelerator = training.make_accelerator(args, args.output_dir)
    device, dtype = accelerator.device, training.frozen_dtype(accelerator)
    if accelerator.is_main_process:
        artifacts.clear_output_dir(args.output_dir, overwrite=args.overwrite, resuming=resuming)
        artifacts.atomic_write_json(Path(args.output_dir) / "run_args.json", vars(args))
    accelerator.wait_for_everyone()

    # ---- model: frozen weights in half precision on GPU, trainable rows in fp32
    training.place_frozen(model, device, dtype, gradient_checkpointing=args.gradient_checkpointing)
    modules = install_embeddings(inp)
    params = [m.new for m in modules]

    # ---- data
    world, rank, local_b = accelerator.num_processes, accelerator.process_index, args.train_batch_size
    global_b = local_b * world
    data = ConceptImages(concepts, args.resolution, args.center_crop, property=args.learnable_property,
                         random_flip=args.random_flip, seed=args.seed, num_workers=args.dataloader_num_workers)
    cache = LatentCache(model.vae, data, device, model.vae.dtype) if args.cache_latents else None
    if cache is not None and not args.validation_prompt:
        model.vae.to("cpu")  # only validation decodes; free the device memory

    max_steps = training.resolve_steps(args, data, world, DEFAULT_STEPS)
    lr = training.scaled_lr(args.learning_rate, args, world)
    optimizer = accelerator.prepare(training.make_optimizer([{"params": params, "lr": lr}], args))
    lr_scheduler = training.make_lr_scheduler(args, optimizer, max_steps)
    noise = training.NoiseSource(args.seed, device, global_b, rank, local_b)
    trainables = {f"embedding.{i}": p for i, p in enumerate(params)}

    def save_artifacts(out):
        write_stage_outputs(out, "ti", inp, modules, args)

    step = 0
    if resume_path is not None:
        step = checkpoint.load_checkpoint(resume_path, trainables, optimizer, lr_scheduler, accelerator.scaler,
                                          noise.gen)
        logger.info(f"resumed from {resume_path} at step {step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("clif_ti", config={k: str(v) for k, v in vars(args).items()})
    logger.info(f"{len(concepts)} concepts, {len(data)} images, {max_steps} steps, global batch {global_b} "
                f"x {args.gradient_accumulation_steps} accumulation, {model.family}, {device}, frozen {dtype}")

    # ---- loop: one optimizer step = gradient_accumulation_steps micro-batches of the sample stream
    accum = args.gradient_accumulation_steps
    bar = tqdm(total=max_steps, initial=step, desc="ti", disable=not accelerator.is_local_main_process)
    timer = training.StepTimer(device)
    while step < max_steps:
        timer.start()
        total = 0.0
        for micro in range(accum):
            sample = data.micro_batch(step * accum + micro, global_b, rank, local_b, with_pixels=cache is None)
            with accelerator.autocast():
                loss = training.diffusion_loss(model, sample, cache, noise, dtype=dtype,
                                               noise_offset=args.noise_offset)
            accelerator.backward(loss / accum)
            total += loss.detach().float() / accum
        training.all_reduce_grads(params, accelerator)
        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        timer.stop()
        logs = {"loss": accelerator.reduce(total, "mean").item(), "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm)}
        accelerator.log(logs, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if accelerator.is_main_process and (step % args.checkpointing_steps == 0 or step == max_steps):
            checkpoint.save_checkpoint(args.output_dir, step, trainables, optimizer, lr_scheduler, accelerator.scaler,
                                       noise.gen, limit=args.checkpoints_total_limit, write_artifacts=save_artifacts)
        if accelerator.is_main_process and args.validation_prompt and (
                step % args.validation_steps == 0 or step == max_steps):
            render_validation(model, args.validation_prompt, num_images=args.num_validation_images, seed=args.seed,
                              steps=args.validation_inference_steps, resolution=args.resolution, device=device,
                              dtype=dtype, out_dir=Path(args.output_dir), step=step, accelerator=accelerator)
    bar.close()

    # ---- save
    if accelerator.is_main_process:
        save_artifacts(Path(args.output_dir))
        artifacts.atomic_write_json(Path(args.output_dir) / "run_stats.json", timer.stats())
        logger.info(f"wrote {args.output_dir}")
    del optimizer, modules, params
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
