"""Prior preservation: class images generated once with the base model and cached in --class_data_dir."""

from __future__ import annotations

from pathlib import Path

import torch

from clif import seeds
from clif.concepts import Concept, list_images
from clif.images import fill_with_generated, missing_images
from clif.train import training
from clif.train.data import Shard, image_stream


def ensure_class_images(args, model, accelerator, *, dtype: torch.dtype) -> None:
    """Generate the missing --num_class_images on the main process (cached in --class_data_dir); the others wait."""
    if not missing_images(args.class_data_dir, args.num_class_images):
        return
    if accelerator.is_main_process:
        generate_class_images(
            model,
            args.class_data_dir,
            args.class_prompt,
            args.num_class_images,
            device=accelerator.device,
            dtype=dtype,
            seed=seeds.stream(args.seed, "generated"),
        )
    accelerator.wait_for_everyone()


def generate_class_images(
    model, class_dir: str | Path, prompt: str, n: int, *, device, dtype, seed: int, batch_size: int = 4, steps: int = 30
) -> None:
    """Fill `class_dir` up to `n` images of `prompt` with the frozen base components (before any adapter)."""
    pipe = model.pipeline_class(vae=model.vae, unet=model.unet, scheduler=_sampler(model), **model.text_components())
    pipe.set_progress_bar_config(disable=True)
    fill_with_generated(
        pipe.to(device),
        Path(class_dir),
        prompt,
        n,
        seed=seed,
        name="class-{:05d}.png",
        steps=steps,
        batch_size=batch_size,
        dtype=dtype,
        desc="class images",
    )


def _sampler(model):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(model.noise_scheduler.config)


class PriorPreservation:
    """The class-image term of the stage-3 loss: its own sample and noise streams, weighted by --prior_loss_weight."""

    def __init__(self, args, model, device, shard: Shard):
        images = list_images(Path(args.class_data_dir))[: args.num_class_images]
        cls = Concept(
            name="class", token=args.class_prompt, initializer="", class_word="", images=images, num_vectors=1
        )
        self.data, self.cache = image_stream(
            [cls], args, model.vae, device, seed=seeds.stream(args.seed, "prior_data"), property="fixed"
        )
        self.noise = training.NoiseSource(
            seeds.stream(args.seed, "prior_noise"), device, shard.global_batch, shard.rank, shard.local
        )
        self.shard, self.weight = shard, args.prior_loss_weight

    def loss(self, model, k: int, **loss_kwargs) -> torch.Tensor:
        """Weighted denoising loss of micro-batch `k` of the class images."""
        return self.weight * training.micro_batch_loss(
            model, self.data, self.cache, self.noise, self.shard, k, **loss_kwargs
        )
