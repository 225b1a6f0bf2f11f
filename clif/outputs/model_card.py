"""The README.md model card each stage writes into its output folder (as diffusers' training scripts do): base
model, concepts and trigger tokens, the stage chain, key arguments, how to load the files, the last validation grid.
The format of every file it names: docs/formats.md."""

from __future__ import annotations

import json
from pathlib import Path

from clif.concepts import Concept
from clif.outputs.artifacts import ENCODER_KEYS, MANIFEST, atomic_write_bytes

CARD = "README.md"
STAGES = {"clif": "stage 1, contrastive (train_clif.py)", "ti": "stage 2, textual inversion (train_ti.py)",
          "lora": "stage 3, LoRA + embeddings (train_lora.py)"}  # fmt: skip
# the arguments a reader wants first; the card names where all of them are (clif_manifest.json)
KEY_ARGS = (
    "seed", "resolution", "max_train_steps", "num_train_epochs", "train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler", "mixed_precision", "num_pairs", "train_text_encoder", "rank", "lora_alpha",
    "lora_targets", "embedding_learning_rate", "train_text_encoder_lora", "with_prior_preservation", "snr_gamma",
    "concept_balance",
)  # fmt: skip
STATS = "run_stats.json"


def stage_chain(stage: str, inputs: list[str]) -> list[str]:
    """The stages that led here, first to last, followed through the manifests of the input stage dirs."""
    chain, seen = [stage], set()
    while inputs and inputs[0] not in seen:
        seen.add(inputs[0])
        try:
            manifest = json.loads((Path(inputs[0]) / MANIFEST).read_text())
        except (OSError, ValueError):
            break
        chain.insert(0, manifest.get("stage", "?"))
        inputs = [str(p) for p in manifest.get("inputs", [])]
    return chain


def last_grid(out: Path) -> str | None:
    """The newest validation grid of this run, relative to `out` (a checkpoint's grids are in its parent)."""
    for folder, prefix in ((out / "validation", "validation/"), (out.parent / "validation", "../validation/")):
        grids = sorted(folder.glob("step-*.png")) if folder.is_dir() else []
        if grids:
            return prefix + grids[-1].name
    return None


def run_stats(out: Path) -> dict:
    """The run's run_stats.json ({} in checkpoints, which have none)."""
    try:
        stats = json.loads((out / STATS).read_text())
    except (OSError, ValueError):
        return {}
    return stats if isinstance(stats, dict) else {}


def segmix_section(out: Path) -> list[str]:
    """Stage 3 with --segmix_prob: how many samples were two-concept collages, and which concept on which side."""
    mix = run_stats(out).get("segmix")
    if not isinstance(mix, dict):
        return []
    return [
        "",
        "## Seg-Mix",
        "",
        (
            f"Seg-Mix was on (`--segmix_prob {mix.get('prob')}`): {mix.get('collage_samples')} of {mix.get('samples')} "
            f"training samples were collages of two concepts' cut-outs, captioned `{mix.get('caption')}`, the loss "
            f"weighing their background {mix.get('background_weight')} and the pasted subjects 1 (a pool of "
            f"{mix.get('pool')} collages; `{STATS}`)."
        ),
        "",
        "| left | right | samples |",
        "|---|---|---|",
        *[f"| {s.get('left')} | {s.get('right')} | {s.get('samples')} |" for s in mix.get("sides", [])],
    ]


def samples_section(out: Path, concepts: list[Concept], args: dict) -> list[str]:
    """The card's table of samples per concept, from the run's run_stats.json (absent in checkpoints: none):
    stages 2-3 the training samples that showed each concept, stage 1 its contrastive pairs."""
    stats = run_stats(out)
    balance = f"`--concept_balance {args.get('concept_balance')}`; `repeats` weights a concept; `{STATS}`"
    if isinstance(stats.get("samples_per_concept"), dict):
        counts, column = stats["samples_per_concept"], "samples"
        about = f"How many training samples showed each concept ({balance})."
    elif isinstance(stats.get("pairs_per_concept"), dict):
        counts, column = stats["pairs_per_concept"], "pairs"
        about = (
            "How many of the stage's contrastive pairs show each concept (Global and Region pairs shared by "
            f"{balance}; a Mix pair counts for both of its concepts)."
        )
    else:
        return []
    return [
        "",
        "## Samples per concept",
        "",
        about,
        "",
        f"| concept | images | repeats | {column} |",
        "|---|---|---|---|",
        *[f"| {c.name} | {len(c.images)} | {c.repeats} | {counts.get(c.name, 0)} |" for c in concepts],
    ]


def write_model_card(
    out: Path,
    *,
    stage: str,
    family: str,
    base: str,
    concepts: list[Concept],
    args: dict,
    inputs: list[str],
    files: dict[str, list[str]],
) -> None:
    """Write out/README.md (atomically)."""
    two = ENCODER_KEYS[family] is not None  # SDXL: one row set per text encoder, loaded per encoder
    lora_file = files.get("lora", [None])[0]
    encoders = files.get("text_encoder", [])  # whole fine-tuned text encoders (stage 1 --train_text_encoder full)
    kohya = sorted(p.name for p in out.glob("*_kohya.safetensors"))
    chain = " -> ".join(STAGES.get(s, s) for s in stage_chain(stage, inputs))
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        f"tags: [clif, textual-inversion, {family}" + (", lora" if lora_file else "") + "]",
        "---",
        "",
        f"# CLIF {STAGES.get(stage, stage)}",
        "",
        f"Base model: `{base}` (family `{family}`). Stage chain: {chain}.",
        "",
        "| concept | trigger token | vectors | initializer | class |",
        "|---|---|---|---|---|",
        *[f"| {c.name} | `{c.token}` | {c.num_vectors} | {c.initializer} | {c.class_word} |" for c in concepts],
        "",
        (
            "Write the trigger token in a prompt, e.g. "
            f"`a photo of {concepts[0].token if concepts else '<token>'} on a beach`."
        ),
        "",
        "## Key arguments",
        "",
        *[
            f"- `--{k}` {args[k]}"
            for k in KEY_ARGS
            if args.get(k) is not None and args.get(k) is not False and args.get(k) != ""
        ],
        "",
        f"All arguments: `{MANIFEST}` (`args`) and `run_args.json`.",
        *samples_section(out, concepts, args),
        *segmix_section(out),
        "",
        "## Files",
        "",
        "- `embeddings/<name>.safetensors`: one per concept"
        + (f" (`{'` and `'.join(ENCODER_KEYS[family])}` rows)" if two else " (`{token: rows}`)"),
        *([f"- `{lora_file}`: the diffusers LoRA file (rank and alpha in its header)"] if lora_file else []),
        *[f"- `{k}`: the same LoRA in kohya keys, embeddings bundled (A1111, ComfyUI)" for k in kohya],
        *[
            f"- `{e}/`: the whole fine-tuned text encoder (transformers `save_pretrained` folder, base vocabulary; "
            "load it before the embeddings)"
            for e in encoders
        ],
        f"- `{MANIFEST}`: what this folder holds; later stages and inference.py read it",
        "",
        "## Load it",
        "",
        (
            "With this repository: `python inference.py --pretrained_model_name_or_path "
            f'{base} --stage_dir <this folder> --prompt "..." --output_dir <out>`.'
        ),
        *_two_concepts(concepts),
        "",
        "diffusers:",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        *(["from safetensors.torch import load_file"] if two else []),
        "",
        *[_load_encoder(out, e) for e in encoders],
        f'pipe = DiffusionPipeline.from_pretrained("{base}", dtype=torch.float16'
        + "".join(f", {e}={e}" for e in encoders)
        + ').to("cuda")',
        *[_load_embedding(c, ENCODER_KEYS[family]) for c in concepts],
        *(['pipe.load_lora_weights("<this folder>")'] if lora_file else []),
        "```",
        "",
        (
            "A1111 / ComfyUI / kohya: not supported for this folder: their LoRA and embedding files cannot carry a "
            "whole fine-tuned text encoder (train stage 1 with `--train_text_encoder none` or `lora` for them)."
            if encoders
            else "A1111 / ComfyUI: copy `embeddings/<name>.safetensors` into the embeddings folder (the trigger word "
            "is the file stem, e.g. `"
            + (concepts[0].name if concepts else "name")
            + "`)"
            + (
                ", and the `_kohya.safetensors` file into the LoRA folder (it bundles the embeddings)."
                if kohya
                else "."
            )
        ),
        "",
        *(
            []
            if encoders
            else [
                "",
                "kohya (sd-scripts): "
                + (
                    "the `_kohya.safetensors` file is a kohya network file (`networks.lora`, real alpha in its header)."
                    if kohya
                    else "train stage 3 with `--export_kohya` for a kohya-format LoRA file."
                ),
            ]
        ),
        "",
        "Formats of every file: `docs/formats.md` of the CLIF repository.",
    ]
    grid = last_grid(out)
    if grid:
        lines += ["", "## Last validation grid", "", f"![validation]({grid})"]
    atomic_write_bytes(out / CARD, ("\n".join(lines) + "\n").encode())


# inference.py's default for a prompt naming two or more concepts (clif.compose.plan.Options; a test keeps them equal)
MULTI_CONCEPT_DEFAULT = "--regions auto --region_prompt class"


def _two_concepts(concepts: list) -> list[str]:
    """How to write a prompt with two of the concepts, and what inference.py does with it by default."""
    if len(concepts) < 2:
        return []
    flags = MULTI_CONCEPT_DEFAULT
    how = f"`{flags}` by default" if flags else "none by default; `--regions auto --region_prompt class` gives each"
    return [
        "",
        (
            f'Two concepts in one prompt, e.g. `--prompt "a photo of a {concepts[0].token} on the left and a '
            f'{concepts[1].token} on the right"`: regional prompts: {how} (docs/composition.md of the CLIF toolkit).'
        ),
    ]


def _load_encoder(out: Path, name: str) -> str:
    """The lines that load a whole fine-tuned text encoder folder with its own transformers class."""
    cls = json.loads((out / name / "config.json").read_text())["architectures"][0]
    return (
        f'from transformers import {cls}\n{name} = {cls}.from_pretrained("<this folder>/{name}", dtype=torch.float16)'
    )


def _load_embedding(c: Concept, keys: tuple[str, ...] | None) -> str:
    """The diffusers lines that load concept `c`: one call, or one per text encoder (`keys`: the file's keys)."""
    path = f"<this folder>/embeddings/{c.name}.safetensors"
    if keys is None:
        return f'pipe.load_textual_inversion("{path}")'
    calls = [
        f'pipe.load_textual_inversion(state["{key}"], token="{c.token}", text_encoder=pipe.text_encoder{sfx}, '
        f"tokenizer=pipe.tokenizer{sfx})"
        for key, sfx in zip(keys, ["", *(f"_{i + 2}" for i in range(len(keys) - 1))])
    ]
    return "\n".join([f'state = load_file("{path}")', *calls])
