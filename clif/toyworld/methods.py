"""The methods the toy-world experiment compares, as data. A method is a chain of stages; a stage is a folder tag,
the script it runs and the flags it adds to that script's common command line. Chains that begin alike share
their stage folders (`<tag>-<tag>-...`), so e.g. every CLIF variant built on `clif`'s stage 1 trains it once.

Stage-1 variants (evidence issue): what stage 1 trains, and whether stage 2 may retrain its rows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple


class Stage(NamedTuple):
    tag: str  # its folder name in the chain
    script: str  # clif (train_clif), ti (train_ti) or lora (train_lora)
    flags: tuple[str, ...] = ()


TI, LORA = Stage("ti", "ti"), Stage("lora", "lora")
CLIF = Stage("clif", "clif")  # the concept-token rows only
CLIF_TE = Stage("clif_te", "clif", ("--train_text_encoder", "lora", "--text_encoder_lr", "1e-3"))
CLIF_FULL = Stage("clif_full", "clif", ("--train_text_encoder", "full", "--text_encoder_lr", "1e-4"))
# issue 23: today's sampling (uniform over images) against the default (each concept the same share)
TI_BY_IMAGES = Stage("ti_by_images", "ti", ("--concept_balance", "images"))
LORA_BY_IMAGES = Stage("lora_by_images", "lora", ("--concept_balance", "images"))
# stage 2 skipped and stage 3's concept rows frozen: the rows the UNet sees are exactly stage 1's
LORA_FROZEN_ROWS = Stage("lora_frozen", "lora", ("--embedding_learning_rate", "0"))
# issue 27: stage 3 with Seg-Mix at MuDI's published setting (README: --segmix_prob 0.3 --soft_alpha 1.0, no loss mask):
# on distinct, seed 0, no p in {0.1, 0.3, 0.5} drew a correct pair, and the mask cost fidelity at every p
LORA_SEGMIX = Stage("lora_segmix", "lora", ("--segmix_prob", "0.3", "--segmix_background_weight", "1"))

METHODS: dict[str, tuple[Stage, ...]] = {
    "ti": (TI,),
    "ti_lora": (TI, LORA),
    "clif": (CLIF, TI, LORA),
    "clif_te": (CLIF_TE, TI, LORA),
    "clif_full": (CLIF_FULL, TI, LORA),
    "clif_frozen": (CLIF, LORA_FROZEN_ROWS),
    "ti_lora_by_images": (TI_BY_IMAGES, LORA_BY_IMAGES),
    "ti_lora_segmix": (TI, LORA_SEGMIX),
    "clif_segmix": (CLIF, TI, LORA_SEGMIX),
}
LADDER = ("ti", "ti_lora", "clif", "clif_te", "clif_full", "clif_frozen")  # the ladder's default methods
LABELS = {
    "ti": "(c) TI",
    "ti_lora": "(a) TI+LoRA",
    "clif": "(b) CLIF: token rows",
    "clif_te": "CLIF + text-encoder LoRA",
    "clif_full": "CLIF + whole text encoder",
    "clif_frozen": "CLIF rows frozen after stage 1",
    "ti_lora_by_images": "TI+LoRA, --concept_balance images",
    "ti_lora_segmix": "TI+LoRA + Seg-Mix",
    "clif_segmix": "CLIF + Seg-Mix",
}


def stage_argv(
    stage: Stage, base: Path, data: Path, out: Path, prev: Path | None, seed: int, steps: dict, common: str
) -> list[str]:
    """Command line of one stage: the same for every method but for --stage_dir and the stage's own flags."""
    flags = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out)]
    flags += ["--seed", str(seed), "--report_to", "none", "--num_vectors", "2"]
    flags += ["--stage_dir", str(prev)] if prev is not None else []
    if stage.script == "clif":
        # common-concept negatives: other instances of the class, rendered with their masks (as the paper does)
        flags += ["--common_words", common, "--cache_dir", str(out.parent / "stage1-cache"), "--num_pairs", "600"]
        flags += ["--train_batch_size", "64", "--learning_rate", "5e-3", "--max_train_steps", str(steps["clif"])]
        return [sys.executable, "-m", "train_clif", *flags, "--lr_scheduler", "constant", *stage.flags]
    flags += ["--resolution", str(steps["size"]), "--train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    flags += ["--cache_latents", "--lr_scheduler", "constant"]
    if stage.script == "ti":
        flags += ["--learning_rate", "5e-3", "--max_train_steps", str(steps["ti"])]
        return [sys.executable, "-m", "train_ti", *flags, *stage.flags]
    flags += ["--rank", "8", "--learning_rate", "1e-3", "--embedding_learning_rate", "1e-3"]
    return [sys.executable, "-m", "train_lora", *flags, "--max_train_steps", str(steps["lora"]), *stage.flags]


def chain_dirs(method: str, work: Path) -> list[tuple[Stage, Path]]:
    """Each stage of `method` with its folder under `work` (stage k's folder names the chain up to k)."""
    out, key = [], []
    for stage in METHODS[method]:
        key.append(stage.tag)
        out.append((stage, work / "-".join(key)))
    return out
