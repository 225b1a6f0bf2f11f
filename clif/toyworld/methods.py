"""The methods the toy-world experiment compares, as data. A method is a chain of stages; a stage is a folder tag,
the script it runs and the flags it adds to that script's common command line. Chains that begin alike share
their stage folders (`<tag>-<tag>-...`), so e.g. every CLIF variant built on `clif`'s stage 1 trains it once.

A method may also carry inference.py flags (regions, isolated encoding): methods with the same chain share its
stage folders and differ only in generation. Stage-1 variants: what stage 1 trains, and whether stage 2 may retrain
its rows.
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
# the earlier sampling (uniform over images) against the default (each concept the same share)
TI_BY_IMAGES = Stage("ti_by_images", "ti", ("--concept_balance", "images"))
LORA_BY_IMAGES = Stage("lora_by_images", "lora", ("--concept_balance", "images"))
# stage 2 skipped and stage 3's concept rows frozen: the rows the UNet sees are exactly stage 1's
LORA_FROZEN_ROWS = Stage("lora_frozen", "lora", ("--embedding_learning_rate", "0"))
# stage 3 with Seg-Mix at MuDI's published setting (README: --segmix_prob 0.3 --soft_alpha 1.0, no loss mask):
# on distinct, seed 0, no p in {0.1, 0.3, 0.5} drew a correct pair, and the mask cost fidelity at every p
LORA_SEGMIX = Stage("lora_segmix", "lora", ("--segmix_prob", "0.3", "--segmix_background_weight", "1"))


class Method(NamedTuple):
    """A training chain and the inference.py flags its images are generated with. Methods with the same chain
    share its stage folders, so a generation-only method costs generation alone."""

    stages: tuple[Stage, ...]
    generate: tuple[str, ...] = ()


PLAIN = ("--regions", "none", "--isolate", "none")  # stated, so a later change of inference.py's defaults keeps them
REGIONS = ("--regions", "auto", "--isolate", "none")  # region prompts 'same' (the pilot's)
REGIONS_CLASS = ("--regions", "auto", "--region_prompt", "class", "--isolate", "none")
ISOLATE = ("--regions", "none", "--isolate", "mask")
TI_LORA, CLIF_CHAIN = (TI, LORA), (CLIF, TI, LORA)

METHODS: dict[str, Method] = {
    "ti": Method((TI,), PLAIN),
    "ti_lora": Method(TI_LORA, PLAIN),
    "clif": Method(CLIF_CHAIN, PLAIN),
    "clif_te": Method((CLIF_TE, TI, LORA), PLAIN),
    "clif_full": Method((CLIF_FULL, TI, LORA), PLAIN),
    "clif_frozen": Method((CLIF, LORA_FROZEN_ROWS), PLAIN),
    "ti_lora_by_images": Method((TI_BY_IMAGES, LORA_BY_IMAGES), PLAIN),
    # generation-time composition on the trained chains
    "ti_lora_regions": Method(TI_LORA, REGIONS),
    "ti_lora_regions_class": Method(TI_LORA, REGIONS_CLASS),
    "ti_lora_regions_class_early": Method(TI_LORA, (*REGIONS_CLASS, "--region_steps", "0:0.5")),
    "ti_lora_regions_bias": Method(TI_LORA, (*REGIONS, "--region_mode", "bias")),
    "ti_lora_regions_attention": Method(TI_LORA, ("--regions", "attention", "--region_prompt", "class")),
    "ti_lora_isolate": Method(TI_LORA, ISOLATE),
    "ti_lora_isolate_alone": Method(TI_LORA, ("--regions", "none", "--isolate", "alone")),
    "clif_regions": Method(CLIF_CHAIN, REGIONS),
    "clif_regions_class": Method(CLIF_CHAIN, REGIONS_CLASS),
    "clif_isolate": Method(CLIF_CHAIN, ISOLATE),
    # stage 3 trained on two-concept collages (MuDI's Seg-Mix)
    "ti_lora_segmix": Method((TI, LORA_SEGMIX), PLAIN),
    "clif_segmix": Method((CLIF, TI, LORA_SEGMIX), PLAIN),
    "ti_lora_segmix_regions_class": Method((TI, LORA_SEGMIX), REGIONS_CLASS),
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
    "ti_lora_regions": "TI+LoRA + regions (same)",
    "ti_lora_regions_class": "TI+LoRA + regions (class)",
    "ti_lora_regions_class_early": "TI+LoRA + regions (class), first half of steps",
    "ti_lora_regions_bias": "TI+LoRA + regional bias",
    "ti_lora_regions_attention": "TI+LoRA + regions from attention maps (class)",
    "ti_lora_isolate": "TI+LoRA + isolation (mask)",
    "ti_lora_isolate_alone": "TI+LoRA + isolation (alone)",
    "clif_regions": "CLIF + regions (same)",
    "clif_regions_class": "CLIF + regions (class)",
    "clif_isolate": "CLIF + isolation (mask)",
    "ti_lora_segmix": "TI+LoRA + Seg-Mix",
    "clif_segmix": "CLIF + Seg-Mix",
    "ti_lora_segmix_regions_class": "TI+LoRA + Seg-Mix + regions (class)",
}


def generation_options(method: str):
    """The composition options (clif.compose.plan.Options) a method's images are generated with."""
    import argparse

    from clif.compose.plan import add_args, options_from_args

    p = argparse.ArgumentParser()
    add_args(p)
    return options_from_args(p.parse_args(list(METHODS[method].generate)))


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
    for stage in METHODS[method].stages:
        key.append(stage.tag)
        out.append((stage, work / "-".join(key)))
    return out
