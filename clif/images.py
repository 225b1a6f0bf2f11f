"""Image grids and the pipeline built from training components (validation images during training)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from clif.outputs.artifacts import atomic_write_bytes, atomic_write_json


def grid(images: list[Image.Image], cols: int | None = None, captions: list[str] | None = None) -> Image.Image:
    """A contact sheet of equally sized images, optionally with a caption strip under each."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    strip = 14 if captions else 0
    sheet = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        sheet.paste(im.convert("RGB").resize((w, h)), (x, y))
        if captions:
            draw.text((x + 2, y + h + 1), captions[i][: max(4, w // 6)], fill="black")
    return sheet


def missing_images(folder: str | Path, n: int) -> int:
    """How many images `folder` lacks to hold `n`."""
    from clif.concepts import list_images

    folder = Path(folder)
    return max(0, n - (len(list_images(folder)) if folder.is_dir() else 0))


@torch.no_grad()
def fill_with_generated(
    pipe,
    folder: Path,
    prompt: str,
    n: int,
    *,
    seed: int,
    name: str,
    steps: int = 30,
    batch_size: int = 1,
    dtype: torch.dtype | None = None,
    desc: str | None = None,
) -> None:
    """Generate images of `prompt` into `folder` until it holds `n` (a cache: a rerun adds only what is missing).

    Image i uses torch.Generator('cpu').manual_seed(seed + i) and is saved as `name.format(i)`.
    """
    from tqdm.auto import tqdm

    start = n - missing_images(folder, n)
    starts = range(start, n, batch_size)
    for s in tqdm(starts, desc=desc, disable=desc is None or not starts):
        idx = list(range(s, min(n, s + batch_size)))
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in idx]
        with torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype not in (None, torch.float32)):
            images = pipe([prompt] * len(idx), num_inference_steps=steps, generator=gens).images
        for i, im in zip(idx, images):
            save_png(im, folder / name.format(i))


def save_png(image: Image.Image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


@torch.no_grad()
def render_validation(
    model,
    prompts: list[str],
    *,
    num_images: int,
    seed: int,
    steps: int,
    resolution: int,
    device,
    dtype: torch.dtype,
    out_dir: Path,
    step: int,
    accelerator=None,
) -> None:
    """Render `num_images` per prompt with the weights being trained; write validation/step-<n>.png and .json.

    Uses its own CPU generators, so the training RNG streams are untouched and resume stays exact.
    """
    from diffusers import DPMSolverMultistepScheduler

    pipe = model.pipeline_class(
        vae=model.vae,
        unet=model.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(model.noise_scheduler.config),
        **model.text_components(),
    )
    pipe.set_progress_bar_config(disable=True)
    vae_device = model.vae.device
    model.vae.to(device)  # the latent cache may have parked it on the CPU
    images = []
    for prompt in prompts:
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = pipe(
                [prompt] * num_images, num_inference_steps=steps, height=resolution, width=resolution, generator=gens
            )
        images += out.images
    model.vae.to(vae_device)
    sheet = grid(images, cols=num_images, captions=[p for p in prompts for _ in range(num_images)])
    save_png(sheet, out_dir / "validation" / f"step-{step:06d}.png")
    atomic_write_json(
        out_dir / "validation" / f"step-{step:06d}.json",
        {"step": step, "prompts": prompts, "num_images": num_images, "seed": seed},
    )
    writer = _tensorboard_writer(accelerator)
    if writer is not None:
        import numpy as np

        writer.add_image("validation", np.asarray(sheet), step, dataformats="HWC")


def _tensorboard_writer(accelerator):
    """The SummaryWriter of the run's tensorboard tracker, if it logs to tensorboard."""
    for tracker in getattr(accelerator, "trackers", []) if accelerator is not None else []:
        if tracker.name == "tensorboard":
            return tracker.writer
    return None
