"""Generation with any stage's output through stock diffusers loaders (so the files are what gets tested)."""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch

from clif import full_text, lora
from clif.errors import UserError, loading
from clif.models import DiffusionModel, detect_family, from_pipeline, pipeline_extras, quiet_loading, read_text_side
from clif.outputs import artifacts
from clif.tokens import known_tokens
from clif.validate import read_json, read_text

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def auto_device_dtype(dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA (fp16) > MPS (fp16) > CPU (fp32), unless --dtype names one."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return device, torch.float32 if device.type == "cpu" else torch.float16
    return device, table[dtype]


def check_stage_files(stage_dir: str | Path, manifest: dict, family: str, widths: list[int]) -> list:
    """Every embedding file of a stage dir (shape against the encoders' `widths`) and its LoRA file, checked
    before the first is loaded; returns the embeddings' (rows, metadata)."""
    checked = [
        artifacts.load_embedding_file(Path(stage_dir) / "embeddings" / f"{e['name']}.safetensors", family, widths)
        for e in manifest["concepts"]
    ]
    if (Path(stage_dir) / lora.LORA_FILE).exists():
        artifacts.check_safetensors(Path(stage_dir) / lora.LORA_FILE)
    for f in manifest.get("files", {}).get("text_encoder", []):  # whole fine-tuned text encoders (stage 1 'full')
        artifacts.check_safetensors(Path(stage_dir) / f / full_text.WEIGHTS)
    return checked


def load_embeddings_into(pipe, stage_dir: str | Path, model: DiffusionModel) -> list[dict]:
    """Load every concept embedding of a stage dir with stock `load_textual_inversion` (one call per text encoder,
    as the README shows for SDXL), and its LoRA with `load_lora_weights`; returns the manifest's concepts."""
    manifest = artifacts.read_manifest(stage_dir)
    widths = [e.get_input_embeddings().weight.shape[1] for e in model.text_encoders]
    checked = check_stage_files(stage_dir, manifest, model.family, widths)
    full_text.load(stage_dir, model)  # the whole fine-tuned encoders first: the concept rows go on top of them
    for entry, (rows, _) in zip(manifest["concepts"], checked):
        for r, enc, tok in zip(rows, model.text_encoders, model.tokenizers):
            pipe.load_textual_inversion(r, token=entry["token"], text_encoder=enc, tokenizer=tok)
    if (Path(stage_dir) / lora.LORA_FILE).is_file():
        pipe.load_lora_weights(str(stage_dir))
    return manifest["concepts"]


def load_pipeline(
    base: str,
    stage_dir: str | None,
    *,
    device,
    dtype,
    scheduler: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
):
    """The base pipeline, checked against and loaded with the stage dir's embeddings (and LoRA)."""
    import diffusers
    from diffusers import DiffusionPipeline

    quiet_loading()
    family = detect_family(base, revision)
    manifest = artifacts.read_manifest(stage_dir) if stage_dir else None
    if manifest is not None:  # what the manifest, tokenizer and config files tell, before any weights load
        artifacts.check_stage_compatible(manifest, stage_dir, family, None, base)
        toks, widths = read_text_side(base, family, revision)
        check_stage_files(stage_dir, manifest, family, widths)
        for entry in manifest["concepts"]:
            clash = known_tokens(toks[0], [entry["token"]])
            if clash:
                raise UserError(
                    f"{stage_dir}: token {clash[0]!r} of concept {entry['name']!r} is already a word of {base}'s "
                    "tokenizer"
                )
    with loading("model", base):
        pipe = DiffusionPipeline.from_pretrained(
            base, dtype=dtype, revision=revision, variant=variant, **pipeline_extras(family)
        )
    model = from_pipeline(pipe, family, base)
    if manifest is not None:
        artifacts.check_stage_compatible(manifest, stage_dir, family, model.fingerprint(), base)
        load_embeddings_into(pipe, stage_dir, model)
    if scheduler:
        cls = getattr(diffusers, SCHEDULERS[scheduler])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), family


def call_default(pipe, name: str):
    """The default of one argument of the pipeline's __call__ (e.g. guidance_scale: 7.5 SD, 5.0 SDXL)."""
    import inspect

    return inspect.signature(type(pipe).__call__).parameters[name].default


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-")[:n] or "prompt"


def generate(
    pipe,
    prompts: list[str],
    *,
    n: int,
    seed: int,
    batch_size: int,
    settings: dict,
    out: Path,
    lora_scale: float | None = None,
    progress=None,
    composer=None,
    plans: list | None = None,
) -> list[Path]:
    """Image i of each prompt uses torch.Generator('cpu').manual_seed(seed + i); writes <stem>.png + <stem>.json.
    With a `composer` (clif.compose.plan), prompt i follows plans[i] (regions, isolated encoding, extra files)."""
    from clif.images import save_png

    call = {k: settings[k] for k in ("num_inference_steps", "guidance_scale", "height", "width")}
    if lora_scale is not None:
        call["cross_attention_kwargs"] = {"scale": lora_scale}
    written = []
    for pi, prompt in enumerate(prompts):
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            gens = [torch.Generator("cpu").manual_seed(seed + i) for i in idx]
            if composer is None:
                inputs = {"prompt": [prompt] * len(idx)}
            else:
                inputs = composer.inputs(plans[pi], len(idx), call["num_inference_steps"])
            images = pipe(generator=gens, **inputs, **call).images
            for k, (i, im) in enumerate(zip(idx, images)):
                stem = f"{pi:03d}-{slug(prompt)}-{i:03d}"
                save_png(im, out / f"{stem}.png")
                sidecar = {
                    "prompt": prompt,
                    "seed": seed + i,
                    "prompt_index": pi,
                    "image_index": i,
                    "lora_scale": lora_scale,
                    **settings,
                    **remake_fields(pipe, [seed + j for j in idx], i - start),
                }
                if composer is not None:
                    sidecar["composition"] = composer.sidecar(plans[pi])
                    sidecar.update(composer.save_extras(plans[pi], k, out / stem, im))
                artifacts.atomic_write_json(out / f"{stem}.json", sidecar)
                written.append(out / f"{stem}.png")
            if progress is not None:
                progress.update(len(idx))
    return written


def remake_fields(pipe, batch_seeds: list[int], batch_index: int) -> dict:
    """What else a sidecar needs to re-make its image bit for bit (remake): the batch it was generated in (another
    batch size can change the last bits), the scheduler's config and the library versions."""
    import diffusers

    return {
        "batch_size": len(batch_seeds),
        "batch_seeds": batch_seeds,
        "batch_index": batch_index,
        "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }


def remake(sidecar: str | Path, device: str | None = None):
    """Re-make one image of inference.py from its <stem>.json sidecar alone, with stock diffusers calls (README,
    "Loading the outputs elsewhere"): the base pipeline with the stage dir's embeddings and LoRA, the recorded
    scheduler, and the whole batch the image was generated in; returns its image (PIL). Bitwise equal on the
    sidecar's device and library versions."""
    import diffusers

    s = read_json(sidecar, "sidecar")
    pipe, _ = load_pipeline(
        s["base_model"],
        s["stage_dir"],
        device=torch.device(device or s["device"]),
        dtype=getattr(torch, s["dtype"]),
        revision=s.get("revision"),
        variant=s.get("variant"),
    )
    pipe.scheduler = getattr(diffusers, s["scheduler"]).from_config(s["scheduler_config"])
    extra = {"cross_attention_kwargs": {"scale": s["lora_scale"]}} if s["lora_scale"] is not None else {}
    inputs = {"prompt": [s["prompt"]] * s["batch_size"]}
    comp = s.get("composition") or {}
    if comp.get("regions") or comp.get("isolation"):  # clif's composition: regions need its attention processor
        from clif.compose.plan import Composer, Options, plan_prompts

        opts = Options.from_sidecar(comp)
        plan = plan_prompts([s["prompt"]], artifacts.read_manifest(s["stage_dir"])["concepts"], opts)[0]
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        model = from_pipeline(pipe, detect_family(s["base_model"], s.get("revision")), s["base_model"])
        composer = Composer(
            pipe, model, opts, lora_scale=s["lora_scale"], latent_hw=(s["height"] // f, s["width"] // f)
        )
        inputs = composer.inputs(plan, s["batch_size"], s["num_inference_steps"])
    images = pipe(
        **inputs,
        generator=[torch.Generator("cpu").manual_seed(x) for x in s["batch_seeds"]],
        num_inference_steps=s["num_inference_steps"],
        guidance_scale=s["guidance_scale"],
        height=s["height"],
        width=s["width"],
        **extra,
    ).images
    return images[s["batch_index"]]


def read_prompts_file(path: str) -> list[str]:
    """Prompts of a text file (one a line, # comments) or a JSON list of strings."""
    if Path(path).suffix == ".json":
        data = read_json(path, "prompts file", kind=list)
        if not all(isinstance(x, str) and x.strip() for x in data):
            raise UserError(f"{path} must hold a JSON list of non-empty prompt strings")
        return data
    lines = read_text(path, "prompts file").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _fill(template: str, path, tokens: tuple[str, ...]) -> str:
    """A template with positional slots {0} (and {1}) only; UserError naming the template otherwise."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UserError(f"template {template!r} in {path}: {err}") from None
    bad = [f for f in fields if f not in ("0", "1")]
    if bad:
        raise UserError(f"template {template!r} in {path}: slot {{{bad[0]}}} is not {{0}} or {{1}}")
    return template.format(*tokens)


PROMPT_SETS = Path(__file__).resolve().parents[1] / "dataset"


def expand_prompt_set(spec: str, concepts: list[dict]) -> list[str]:
    """Templates with {0} (single) or {0},{1} (pair) filled with the tokens of every concept / pair of concepts."""
    from itertools import combinations

    path = PROMPT_SETS / f"prompts_{spec}.txt" if spec in ("single", "pair", "lookalike") else Path(spec)
    templates = read_prompts_file(str(path))
    tokens = [c["token"] for c in concepts]
    out = []
    for t in templates:
        if "{1}" in t:
            if len(tokens) < 2:
                raise UserError(f"prompt set {spec!r} has two-concept templates but the stage dir has one concept")
            out += [_fill(t, path, pair) for pair in combinations(tokens, 2)]
        elif "{0}" in t:
            out += [_fill(t, path, (a,)) for a in tokens]
        else:
            raise UserError(f"template {t!r} in {path} has no {{0}} slot")
    return out
