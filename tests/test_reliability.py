"""DESIGN §7 promises: output ownership, locks, atomic finish, determinism, honest kill-and-resume, NaN guard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, ti_args
from safetensors.torch import load_file

import train_lora
import train_ti
from clif import outdir


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"/" for p in sorted(root.rglob("*"))}


def _refused(main, argv, capsys, needle: str, *keep: Path) -> None:
    before = [_tree(k) for k in keep]
    code, err = run_cli(main, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert [_tree(k) for k in keep] == before


@pytest.fixture(scope="module")
def ti_run(tiny_sd15, concept_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own") / "ti"
    train_ti.main(ti_args(tiny_sd15, concept_set, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    return out


def test_overwrite_spares_foreign_folders(tiny_sd15, concept_set, ti_run, tmp_path, capsys):
    photos = tmp_path / "photos"  # looks like a run to a glob, but holds the user's photo
    photos.mkdir()
    (photos / "checkpoint-notes.txt").write_text("notes")
    (photos / "holiday.jpg").write_bytes(b"jpg")
    _refused(train_ti.main, ti_args(tiny_sd15, concept_set, photos, "--overwrite"), capsys, "not a CLIF run", photos)
    mixed = tmp_path / "mixed"  # a real run the user dropped a file into
    shutil.copytree(ti_run, mixed)
    (mixed / "my_notes.txt").write_text("mine")
    _refused(train_ti.main, ti_args(tiny_sd15, concept_set, mixed, "--overwrite"), capsys, "not a CLIF run", mixed)


def test_output_dir_never_an_input(tiny_sd15, concept_set, ti_run, tmp_path, capsys):
    from conftest import SHARED_DATA  # noqa: F401  (the data set itself is never written either)

    argv = ti_args(tiny_sd15, concept_set, ti_run, "--overwrite", "--stage_dir", str(ti_run))
    _refused(train_ti.main, argv, capsys, "--stage_dir", ti_run)
    lora = ["--rank", "2", "--stage_dir", str(ti_run), "--overwrite"]
    _refused(train_lora.main, ti_args(tiny_sd15, concept_set, ti_run, *lora), capsys, "--stage_dir", ti_run)
    inside = concept_set / "runs"
    _refused(train_ti.main, ti_args(tiny_sd15, concept_set, inside), capsys, "--train_data_dir", concept_set)
    assert not inside.exists()
    _refused(train_ti.main, ti_args(tiny_sd15, concept_set, concept_set.parent, "--overwrite"), capsys,
             "contains the input", concept_set)
    _refused(train_ti.main, ti_args(tiny_sd15, concept_set, tiny_sd15, "--overwrite"), capsys,
             "--pretrained_model_name_or_path", tiny_sd15)


def test_concept_name_cannot_escape(tiny_sd15, concept_set, tmp_path, capsys):
    root = tmp_path / "set"
    shutil.copytree(concept_set, root)
    spec = json.loads((root / "concepts.json").read_text())
    spec["concepts"][0].update(name="../../../escaped", images="images/" + spec["concepts"][0]["name"])
    (root / "concepts.json").write_text(json.dumps(spec))
    _refused(train_ti.main, ti_args(tiny_sd15, root, tmp_path / "out"), capsys, "cannot be a file name", tmp_path)


def test_lock_refuses_a_second_run_and_stale_tmp_is_cleaned(tiny_sd15, concept_set, ti_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ti_run, run)
    (run / ".checkpoint-7.tmp").mkdir()  # what a run killed mid-checkpoint leaves
    (run / ".run_stats.json.abc.tmp").write_text("half")
    outdir.open_run_dir(run, overwrite=False, resuming=True)  # a live run holds the folder
    try:
        for extra in (["--overwrite"], ["--resume_from_checkpoint", "latest"]):
            _refused(train_ti.main, ti_args(tiny_sd15, concept_set, run, *extra), capsys, "in use", run)
    finally:
        outdir.release_locks()
    train_ti.main(ti_args(tiny_sd15, concept_set, run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert not (run / ".checkpoint-7.tmp").exists() and not (run / ".run_stats.json.abc.tmp").exists()
    assert not outdir.lock_held(run)
