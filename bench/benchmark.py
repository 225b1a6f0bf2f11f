"""Benchmark of the training stages (not a test): ms/step and peak memory.

Runs the real training scripts in fresh subprocesses (so peak memory is per configuration) on
  * the tiny offline model, and
  * the full SD1.5 architecture built from its config numbers with random weights (no download),
at 256 px, with and without --cache_latents, and prints one table. GPU when present, else CPU.

    python -m bench.benchmark [--steps 8] [--only tiny|full] [--stages ti,lora]

With --compile it compares eager and --torch_compile side by side instead (latents cached): each stage runs eager,
then compiled with an empty inductor cache (the one-off compile a first run pays), then compiled again with that
cache filled (what a second run on the same machine pays); the table gives ms/step after the first step, the
compile time (first step of the compiled run minus the eager run's) and the break-even (steps from which the
compiled run is ahead).

    python -m bench.benchmark --compile --only full --stages ti,lora --steps 6 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sd15_text_config():
    """SD1.5's text encoder (CLIP ViT-L/14 text): hidden 768, 12 layers, 12 heads, intermediate 3072, 77 positions."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        projection_dim=768,
    )


def build_full_sd15(out: Path, dtype=None) -> Path:
    """SD1.5 UNet/VAE/text-encoder architecture (docs/library_notes.md), random weights, real CLIP tokenizer; stored
    in `dtype` (default fp32; torch.float16 halves the 3.4 GB written and read)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from clif.fixtures.tiny import clip_tokenizer, sd_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )
    te = CLIPTextModel(sd15_text_config())
    sched = sd_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    (pipe if dtype is None else pipe.to(dtype)).save_pretrained(out)
    return out


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned process: Linux carries a process's peak RSS over fork and exec, so a model built in
    this process would set the floor of every stage's peak_rss_mb measured after it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def run_stage(
    script: str,
    model: Path,
    data: Path,
    out: Path,
    steps: int,
    cache: bool,
    extra: list[str],
    resolution: int = 256,
    env: dict | None = None,
) -> dict:
    mp = ["--mixed_precision", "fp16"] if _has_cuda() else ["--mixed_precision", "no"]
    cmd = [
        sys.executable,
        "-m",
        script.removesuffix(".py"),
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        str(resolution),
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(10 * steps),
        "--report_to",
        "none",
        *mp,
        *(["--cache_latents"] if cache else []),
        *extra,
    ]
    subprocess.run(
        cmd,
        check=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return json.loads((out / "run_stats.json").read_text())


def unet_floor_ms(model: Path, lora: bool, steps: int, resolution: int = 256) -> float:
    """Median ms of a bare UNet forward+backward on the training batch shape (1 x 4 x 32 x 32 at 256 px).

    Gradient flows to the text conditioning (what TI needs) and, with `lora`, to rank-16 LoRA weights on the
    attention projections: the floor a training step of that stage cannot go under.
    """
    import statistics
    import time

    import torch
    from diffusers import UNet2DConditionModel

    from clif import lora as clif_lora

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device, dtype).requires_grad_(False)
    if lora:
        clif_lora.add_lora(unet, rank=16, alpha=16, dropout=0.0, targets=clif_lora.DEFAULT_UNET_TARGETS, seed=0)
    dim = unet.config.cross_attention_dim
    x = torch.randn(1, 4, resolution // 8, resolution // 8, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    times = []
    for _ in range(steps):
        hidden = torch.randn(1, 77, dim, device=device, dtype=dtype, requires_grad=True)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            out = unet(x, t, hidden).sample
        out.float().pow(2).mean().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del unet
    return 1000 * statistics.median(times[1:])


def compile_rows(name: str, stage: str, run, tmp: Path, modes: list[str]) -> list[dict]:
    """Eager, then per mode a cold and a warm compiled run of one stage; `run(out, extra, env)` -> run_stats."""
    eager = run(tmp / f"{name}-{stage}-eager", [], {})
    rows = [{"mode": "eager", "inductor_cache": "-", **eager}]
    for mode in modes:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}-{stage}-{mode}")}  # empty: a cold compile
        for cache in ("cold", "warm"):
            out = tmp / f"{name}-{stage}-{mode}-{cache}"
            stats = run(out, ["--torch_compile", "--compile_mode", mode], env)
            rows.append({"mode": mode, "inductor_cache": cache, **stats})
    for row in rows:
        row.update(model=name, stage=stage)
        if row["mode"] == "eager":
            continue
        compile_ms = row["first_step_ms"] - eager["first_step_ms"]
        saved_ms = eager["median_step_ms"] - row["median_step_ms"]
        row["compile_s"] = compile_ms / 1000
        row["speedup"] = eager["median_step_ms"] / row["median_step_ms"]
        # steps after which compile time + n compiled steps < n eager steps; None: never
        row["break_even_steps"] = math.ceil(compile_ms / saved_ms) if saved_ms > 0 else None
    return rows


def print_compile_row(row: dict) -> None:
    mem = row.get("peak_cuda_mb") or row["peak_rss_mb"]
    extra = ""
    if row["mode"] != "eager":
        even = row["break_even_steps"]
        extra = (
            f"  compile {row['compile_s']:7.1f} s  x{row['speedup']:4.2f}  "
            f"break-even {'never' if even is None else f'{even} steps'}"
        )
    print(
        f"{row['model']:10s} {row['stage']:5s} {row['mode']:27s} {row['inductor_cache']:5s} "
        f"{row['median_step_ms']:9.1f} ms/step  first {row['first_step_ms'] / 1000:7.1f} s  peak {mem:7.0f} MB"
        f"{extra}  ({row['device']})",
        flush=True,
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compare_compile(args, models: dict[str, Path], data: Path, tmp: Path) -> list[dict]:
    stages = {"ti": "train_ti.py", "lora": "train_lora.py"}
    rows = []
    for name, model in models.items():
        ti_dir = None
        for stage in args.stages.split(","):
            stage_extra = [] if stage == "ti" else ["--stage_dir", str(ti_dir)]

            def run(out, extra, env, stage=stage, stage_extra=stage_extra, model=model):
                return run_stage(
                    stages[stage], model, data, out, args.steps, True, stage_extra + extra, args.resolution, env
                )

            stage_rows = compile_rows(name, stage, run, tmp, args.compile_modes.split(","))
            if stage == "ti":
                ti_dir = tmp / f"{name}-ti-eager"
            for row in stage_rows:
                print_compile_row(row)
            rows += stage_rows
    return rows


def compare_cache(args, models: dict[str, Path], data: Path, tmp: Path) -> list[dict]:
    """Each stage without and with --cache_latents, beside the bare UNet floor."""
    rows = []
    stages = {
        "ti": ("train_ti.py", []),
        "lora": ("train_lora.py", ["--stage_dir", "{ti}"]),
        "lora_frozen_emb": ("train_lora.py", ["--stage_dir", "{ti}", "--embedding_learning_rate", "0"]),
    }
    for name, model in models.items():
        ti_dir = None
        for stage in args.stages.split(","):
            script, extra = stages[stage]
            for cache in (True,) if args.cache_only else (False, True):
                out = tmp / f"{name}-{stage}-{int(cache)}"
                extra_f = [e.format(ti=ti_dir) for e in extra]
                stats = run_stage(script, model, data, out, args.steps, cache, extra_f, args.resolution)
                if cache:  # the floor depends on the stage, not on the cache: measure once
                    stats["floor_ms"] = in_fresh_process(
                        unet_floor_ms, model, stage.startswith("lora"), args.steps, args.resolution
                    )
                    stats["ratio_to_floor"] = stats["median_step_ms"] / stats["floor_ms"]
                if stage == "ti":
                    ti_dir = out
                row = {
                    "model": name,
                    "stage": stage,
                    "resolution": args.resolution,
                    "cache_latents": cache,
                    **stats,
                }
                rows.append(row)
                mem = stats.get("peak_cuda_mb") or stats["peak_rss_mb"]
                floor, ratio = stats.get("floor_ms", float("nan")), stats.get("ratio_to_floor", float("nan"))
                kind = "cuda" if "peak_cuda_mb" in stats else "rss"
                print(
                    f"{name:10s} {args.resolution}px {stage:15s} cache={int(cache)}  "
                    f"{stats['median_step_ms']:9.1f} ms/step  peak {kind} {mem:8.0f} MB  "
                    f"floor {floor:8.1f} ms  ratio {ratio:5.2f}  ({stats['device']})",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="Optimizer steps per configuration (first one not timed).")
    p.add_argument("--only", choices=["tiny", "full"], default=None)
    p.add_argument("--stages", default="ti", help="Comma list of stages to time: ti, lora, lora_frozen_emb.")
    p.add_argument("--resolution", type=int, default=256, help="Training resolution.")
    p.add_argument("--cache_only", action="store_true", help="Only the --cache_latents configurations.")
    p.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    p.add_argument("--compile", action="store_true", help="Eager vs --torch_compile (cold and warm cache) instead.")
    p.add_argument(
        "--compile_modes", default="default", help="Comma list of --compile_mode values timed with --compile."
    )
    args = p.parse_args(argv)
    from clif.fixtures.synthetic import write_concept_set
    from clif.fixtures.tiny import build

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_concept_set(tmp / "data", n_concepts=2, n_images=4, size=256)
        models = {}
        if args.only in (None, "tiny"):
            models["tiny-sd15"] = in_fresh_process(build, "sd15", tmp / "tiny")
        if args.only in (None, "full"):
            models["sd15-arch"] = in_fresh_process(build_full_sd15, tmp / "full")
        rows = (compare_compile if args.compile else compare_cache)(args, models, data, tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
