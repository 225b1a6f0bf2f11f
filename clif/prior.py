"""Prior preservation: class images generated once with the base model and cached in --class_data_dir."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .concepts import list_images


def missing_class_images(class_dir: str | Path, n: int) -> int:
    d = Path(class_dir)
    have = len(list_images(d)) if d.is_dir() else 0
    return max(0, n - have)


@torch.no_grad()
def generate_class_images(
    model, class_dir: str | Path, prompt: str, n: int, *, device, dtype, seed: int, batch_size: int = 4, steps: int = 30
) -> None:
    """Fill `class_dir` up to `n` images of `prompt` with the frozen base components (before any adapter)."""
    from .images import save_png, text_components

    d = Path(class_dir)
    d.mkdir(parents=True, exist_ok=True)
    start = len(list_images(d))
    todo = n - start
    if todo <= 0:
        return
    pipe = model.pipeline_class(vae=model.vae, unet=model.unet, scheduler=_sampler(model), **text_components(model))
    pipe.set_progress_bar_config(disable=True)
    for s in tqdm(range(0, todo, batch_size), desc="class images"):
        idx = list(range(start + s, start + min(todo, s + batch_size)))
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in idx]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = pipe([prompt] * len(idx), num_inference_steps=steps, generator=gens).images
        for i, im in zip(idx, images):
            save_png(im, d / f"class-{i:05d}.png")


def _sampler(model):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(model.noise_scheduler.config)
