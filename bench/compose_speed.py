"""Benchmark of regional sampling (not a test): per-image time of a two-region call as a ratio to plain sampling,
both measured in one process on the same machine, alternating, each repeated (median).

The regions are what `inference.py --regions auto` sets for a two-concept prompt: two boxes (left, right), each
region reading its own prompt's states in every cross-attention layer on the conditional half of the batch.

    python -m bench.compose_speed [--model toyworld|sd15-full|PATH] [--steps 20] [--size 256] [--repeats 3]
        [--json out.json]

sd15-full builds the SD1.5 architecture with random weights (bench.benchmark.build_full_sd15; no download).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load(model: str, tmp: Path):
    from diffusers import DiffusionPipeline

    from clif.generate import auto_device_dtype

    if model == "toyworld":
        model = str(REPO / "pretrained" / "toyworld" / "model")
    elif model == "sd15-full":
        from bench.benchmark import build_full_sd15

        model = str(build_full_sd15(tmp / "sd15"))
    device, dtype = auto_device_dtype()
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), model


def measure(pipe, size: int, steps: int, repeats: int, images: int) -> dict:
    """Median seconds per image, plain and with two regions, alternating in one process."""
    from clif.compose.attention import ComposeState, install

    prompt = "a photo of a red ball on the left and a blue box on the right"
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    state = ComposeState(latent_hw=(size // f, size // f), n_images=images)
    install(pipe.unet, state)
    ids = pipe.tokenizer(
        [prompt.replace("blue box", "red ball"), prompt.replace("red ball", "blue box")],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        regions = pipe.text_encoder(ids.input_ids.to(pipe.device))[0]
    times = {"plain": [], "regions": []}
    for r in range(repeats + 1):  # the first round warms up and is not counted
        for kind, runs in times.items():
            on = kind == "regions"
            state.boxes = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)] if on else []
            state.region_states, state.window, state._weights = (regions if on else None), (0, steps), {}

            def step_done(p, i, t, kw):
                state.step = i + 1
                return kw

            state.step = 0
            gens = [torch.Generator("cpu").manual_seed(k) for k in range(images)]
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            pipe(
                [prompt] * images,
                generator=gens,
                num_inference_steps=steps,
                height=size,
                width=size,
                callback_on_step_end=step_done,
            )
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                runs.append((time.perf_counter() - t) / images)
    plain, reg = statistics.median(times["plain"]), statistics.median(times["regions"])
    return {"plain_s_per_image": plain, "regions_s_per_image": reg, "ratio": reg / plain, "runs": times}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toyworld", help="toyworld, sd15-full, or a diffusers folder.")
    p.add_argument("--size", type=int, default=None, help="Image size (default: 32 toy world, 256 otherwise).")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=1, help="Images per call.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, _ = load(args.model, Path(tmp))
        size = args.size or (32 if args.model == "toyworld" else 256)
        row = {
            "model": args.model,
            "size": size,
            "steps": args.steps,
            "images": args.images,
            "device": str(pipe.device),
            "threads": torch.get_num_threads(),
            **measure(pipe, size, args.steps, args.repeats, args.images),
        }
    print(
        f"{args.model} {size}px {args.steps} steps on {row['device']}: plain {row['plain_s_per_image']:.3f} "
        f"s/image, two regions {row['regions_s_per_image']:.3f} s/image, ratio {row['ratio']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    main()
