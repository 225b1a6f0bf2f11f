"""Every flag of the three trainers changes the result unless it is declared harmless: a resume with a
result-changing flag changed is refused, one with a harmless flag changed continues."""

from __future__ import annotations

import argparse
import json

import pytest

import train_clif
import train_lora
import train_ti
from clif import cli
from clif.errors import UserError
from clif.outputs.artifacts import MANIFEST, atomic_write_json
from clif.outputs.checkpoint import check_resumable

SCRIPTS = {"clif": train_clif, "ti": train_ti, "lora": train_lora}
REQUIRED = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", "o", "--stage_dir", "s"]
# the only flags a resume may change; adding one here is a decision, not an accident
HARMLESS = {
    "output_dir", "overwrite", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "report_to", "validation_prompt", "validation_steps", "num_validation_images", "validation_inference_steps",
    "dataloader_num_workers", "gradient_checkpointing", "cache_dir", "text_chunk_size", "export_kohya",
    "allow_word_names",  # a name check's strictness, not the training
    "max_train_steps", "num_train_epochs",  # the run's length: a resume may continue a run further
}  # fmt: skip
# result-changing flags the old hand-kept list missed (issue 14)
ONCE_MISSED = ["region_segments", "min_region_area", "regions_per_image", "holdout_images", "caption_templates",
               "segmenter", "clip_model", "clip_model_2", "class_prompt", "num_class_images"]


def parsed(name: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = SCRIPTS[name].build_parser()
    argv = REQUIRED if any(a.dest == "stage_dir" for a in parser._actions) else REQUIRED[:6]
    return parser, parser.parse_args(argv)


def flags() -> list[tuple[str, str]]:
    return [(name, a.dest) for name in SCRIPTS for a in parsed(name)[0]._actions if a.dest != "help"]


def other_value(action: argparse.Action, value):
    if action.choices:
        return next(c for c in action.choices if c != value)
    if isinstance(value, bool) or action.nargs == 0:
        return not value
    if isinstance(value, list):
        return [*value, "other"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value + 1
    if value is None and action.type is not None:
        return action.type("1")
    return f"{value}-other"


def as_saved(args: argparse.Namespace) -> dict:
    return json.loads(json.dumps(vars(args), default=str))  # what a checkpoint's manifest holds


@pytest.mark.parametrize("script,flag", flags())
def test_a_resume_with_a_flag_changed_is_refused_unless_harmless(script, flag, tmp_path):
    parser, args = parsed(script)
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    atomic_write_json(ckpt / MANIFEST, {"stage": script, "family": "sd", "base_model": "m",
                                        "base_fingerprint": "f", "concepts": [], "args": as_saved(args)})
    check_resumable(ckpt, [], vars(args), "", harmless=cli.HARMLESS)  # unchanged: continues
    action = next(a for a in parser._actions if a.dest == flag)
    setattr(args, flag, other_value(action, getattr(args, flag)))
    if flag in cli.HARMLESS:
        check_resumable(ckpt, [], vars(args), "", harmless=cli.HARMLESS)
    else:
        with pytest.raises(UserError, match=f"--{flag} "):
            check_resumable(ckpt, [], vars(args), "", harmless=cli.HARMLESS)


def test_harmless_flags_are_the_declared_few():
    flags()  # every parser built: each declares its harmless flags
    assert cli.HARMLESS == HARMLESS
    assert not set(ONCE_MISSED) & cli.HARMLESS
    assert set(ONCE_MISSED) <= {f for _, f in flags()}
