"""Generate images with the output of any CLIF stage (embeddings, and LoRA when present).

Image i of each prompt uses torch.Generator("cpu").manual_seed(seed + i): any single image can be
regenerated elsewhere, and a stock diffusers pipeline loading the same files gives the same pixels.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from clif import cli
from clif.compose import plan as compose
from clif.errors import UserError
from clif.generate import (
    SCHEDULERS,
    auto_device_dtype,
    call_default,
    expand_prompt_set,
    generate,
    load_pipeline,
    read_prompts_file,
)
from clif.images import grid, save_png
from clif.lora import LORA_FILE
from clif.models import from_pipeline
from clif.outputs.artifacts import read_manifest
from clif.outputs.outdir import check_output_dir, lock_dir

PROG = "inference.py"


def build_parser():
    p = cli.make_parser(PROG, __doc__)
    cli.add_model_args(p)
    cli.add_stage_arg(
        p,
        required=False,
        help="Output dir of any stage (or one of its checkpoint-<step> folders); omit for the bare base model.",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="Prompt (repeatable); write concept tokens as trained, e.g. '<dog2> on the beach'.",
    )
    p.add_argument("--prompts_file", default=None, help="Text file, one prompt a line (# comments), or a JSON list.")
    p.add_argument(
        "--prompt_set",
        default=None,
        help="'single' / 'pair' / 'lookalike' (dataset/prompts_*.txt) or a file of templates with {0} (and {1}): "
        "expanded for every concept (pair of concepts) of --stage_dir, the evaluation protocol.",
    )
    p.add_argument("--output_dir", required=True, help="Where <stem>.png, <stem>.json and contact_sheet.png go.")
    p.add_argument("--overwrite", action="store_true", help="Write into an output dir that already holds files.")
    p.add_argument("--num_images_per_prompt", type=cli.positive(int), default=4, help="Images per prompt.")
    p.add_argument("--seed", type=cli.seed_type(), default=0, help="Image i of a prompt uses seed + i.")
    p.add_argument("--num_inference_steps", type=cli.positive(int), default=50, help="Denoising steps.")
    p.add_argument(
        "--guidance_scale",
        type=cli.non_negative(float),
        default=None,
        help="Classifier-free guidance (default: the pipeline's own, 7.5 for SD 1.x/2.x, 5.0 for SDXL).",
    )
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="Sampler (default: the model's own).")
    p.add_argument("--height", type=cli.image_size(), default=None, help="Image height (default: the model's).")
    p.add_argument("--width", type=cli.image_size(), default=None, help="Image width (default: the model's).")
    p.add_argument("--batch_size", type=cli.positive(int), default=4, help="Images generated together.")
    p.add_argument(
        "--lora_scale",
        type=cli.non_negative(float),
        default=None,
        help="Strength of the stage-3 LoRA (default 1.0 when the stage dir has one).",
    )
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="auto: fp16 on GPU, fp32 on CPU."
    )
    compose.add_args(p)
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    return cli.run_script(PROG, build_parser(), run, argv)


def run(args) -> list[Path]:
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if args.prompt_set:
        if not args.stage_dir:
            raise UserError("--prompt_set needs --stage_dir (its concepts fill the templates)")
        prompts += expand_prompt_set(args.prompt_set, read_manifest(args.stage_dir)["concepts"])
    if not prompts:
        raise UserError("no prompt: pass --prompt (repeatable), --prompts_file or --prompt_set")
    options = compose.options_from_args(args)
    concepts = read_manifest(args.stage_dir)["concepts"] if args.stage_dir else []
    plans = compose.plan_prompts(prompts, concepts, options)  # every composition option checked here
    out = Path(args.output_dir)
    check_output_dir(
        out,
        overwrite=args.overwrite,
        deletes=False,
        inputs=[
            ("--stage_dir", args.stage_dir),
            ("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
        ],
    )
    device, dtype = auto_device_dtype(args.dtype)
    pipe, family = load_pipeline(
        args.pretrained_model_name_or_path,
        args.stage_dir,
        device=device,
        dtype=dtype,
        scheduler=args.scheduler,
        revision=args.revision,
        variant=args.variant,
    )
    lora_scale = args.lora_scale
    if lora_scale is None and args.stage_dir and (Path(args.stage_dir) / LORA_FILE).exists():
        lora_scale = 1.0
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    default_size = pipe.unet.config.sample_size * vae_factor
    settings = {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "stage_dir": args.stage_dir,
        "family": family,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale
        if args.guidance_scale is not None
        else call_default(pipe, "guidance_scale"),
        "height": args.height or default_size,
        "width": args.width or default_size,
        "scheduler": type(pipe.scheduler).__name__,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device.type,
    }
    model = from_pipeline(pipe, family, args.pretrained_model_name_or_path)
    composer = compose.Composer(
        pipe,
        model,
        options,
        lora_scale=lora_scale,
        latent_hw=(settings["height"] // vae_factor, settings["width"] // vae_factor),
    )
    lock_dir(out)  # held until the run ends: a second run into this folder is refused
    total = len(prompts) * args.num_images_per_prompt
    with tqdm(total=total, desc="images") as bar:
        paths = generate(
            pipe,
            prompts,
            n=args.num_images_per_prompt,
            seed=args.seed,
            batch_size=args.batch_size,
            settings=settings,
            out=out,
            lora_scale=lora_scale,
            progress=bar,
            composer=composer,
            plans=plans,
        )
    from PIL import Image

    images = [Image.open(p) for p in paths]
    save_png(grid(images, cols=args.num_images_per_prompt), out / "contact_sheet.png")
    print(f"wrote {len(paths)} images to {out}")
    return paths


if __name__ == "__main__":
    main()
