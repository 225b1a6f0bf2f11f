"""Bad input (docs/design.md, "Errors"): one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, ti_args

import inference
import train_ti


def _expect_user_error(main, argv, capsys, out, needle: str):
    code, err = run_cli(main, argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not out.exists(), "a failed run must not create its output dir"


def _copy_set(concept_set, tmp_path, edit):
    root = tmp_path / "edited"
    shutil.copytree(concept_set, root)
    spec = json.loads((root / "concepts.json").read_text())
    edit(root, spec)
    if spec is not None:
        (root / "concepts.json").write_text(json.dumps(spec))
    return root


CASES = {
    "token in vocabulary": (lambda r, s: s["concepts"][0].update(token="dog"), "already in the tokenizer's vocabulary"),
    "multi-token initializer": (lambda r, s: s["concepts"][0].update(initializer="zwxqv"), "need exactly 1"),
    "duplicate token": (lambda r, s: s["concepts"][1].update(token=s["concepts"][0]["token"]), "duplicate token"),
    "no images": (lambda r, s: [p.unlink() for p in (r / "images" / "bluebox").iterdir()], "has no images"),
    "unreadable image": (lambda r, s: (r / "images" / "bluebox" / "01.png").write_bytes(b"not a png"),
                         "bluebox/01.png"),
    "initializer with spaces": (lambda r, s: s["concepts"][0].update(initializer="red ball"), "single word"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_concept_set(case, tiny_sd15, concept_set, tmp_path, capsys):
    edit, needle = CASES[case]
    root = _copy_set(concept_set, tmp_path, edit)
    out = tmp_path / "out"
    _expect_user_error(train_ti.main, ti_args(tiny_sd15, root, out), capsys, out, needle)


def test_invalid_concepts_json(tiny_sd15, concept_set, tmp_path, capsys):
    root = _copy_set(concept_set, tmp_path, lambda r, s: None)
    (root / "concepts.json").write_text("{not json")
    out = tmp_path / "out"
    _expect_user_error(train_ti.main, ti_args(tiny_sd15, root, out), capsys, out, "invalid")


def test_missing_and_empty_data_dir(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_user_error(train_ti.main, ti_args(tiny_sd15, tmp_path / "nope", out), capsys, out, "does not exist")
    (tmp_path / "empty").mkdir()
    _expect_user_error(train_ti.main, ti_args(tiny_sd15, tmp_path / "empty", out), capsys, out, "is empty")


def test_missing_model_and_bad_resolution(concept_set, tiny_sd15, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_user_error(train_ti.main, ti_args(tmp_path / "no_model", concept_set, out), capsys, out, "does not exist")
    argv = ti_args(tiny_sd15, concept_set, out)
    argv[argv.index("--resolution") + 1] = "60"
    _expect_user_error(train_ti.main, argv, capsys, out, "multiple of 8")


def test_stage_dir_checks(tiny_models, concept_set, tmp_path, capsys):
    from clif.fixtures.tiny import build

    sdxl_run = tmp_path / "sdxl_run"
    train_ti.main(ti_args(tiny_models["sdxl"], concept_set, sdxl_run, "--max_train_steps", "1"))
    out = tmp_path / "out"
    _expect_user_error(train_ti.main, ti_args(tiny_models["sd15"], concept_set, out, "--stage_dir", str(sdxl_run)),
                       capsys, out, "family 'sdxl'")
    _expect_user_error(train_ti.main, ti_args(tiny_models["sd15"], concept_set, out, "--stage_dir",
                                              str(tmp_path / "missing")), capsys, out, "does not exist")
    sd_run = tmp_path / "sd_run"
    train_ti.main(ti_args(tiny_models["sd15"], concept_set, sd_run, "--max_train_steps", "1"))
    other_base = build("sd15", tmp_path / "other_base", seed=3)
    _expect_user_error(train_ti.main, ti_args(other_base, concept_set, out, "--stage_dir", str(sd_run)),
                       capsys, out, "base model")
    gen = tmp_path / "gen"
    _expect_user_error(inference.main, ["--pretrained_model_name_or_path", str(tiny_models["sd15"]), "--stage_dir",
                                        str(sdxl_run), "--prompt", "x", "--output_dir", str(gen)], capsys, gen, "family")


def test_output_dir_holding_another_run(tiny_sd15, concept_set, tmp_path, capsys):
    out = tmp_path / "run"
    train_ti.main(ti_args(tiny_sd15, concept_set, out, "--max_train_steps", "1"))
    before = sorted(p.name for p in out.iterdir())
    code, err = run_cli(train_ti.main, ti_args(tiny_sd15, concept_set, out), capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before
    # --overwrite replaces a run, but never a folder that is not one.
    train_ti.main(ti_args(tiny_sd15, concept_set, out, "--overwrite", "--max_train_steps", "2"))
    assert json.loads((out / "clif_manifest.json").read_text())["args"]["max_train_steps"] == 2
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"x")
    code, err = run_cli(train_ti.main, ti_args(tiny_sd15, concept_set, stranger, "--overwrite"), capsys)
    assert code == 2 and "not a CLIF run" in err and (stranger / "holiday.jpg").exists()


@pytest.mark.parametrize("flag,value", [("--num_inference_steps", "0"), ("--num_images_per_prompt", "-1"),
                                        ("--batch_size", "0"), ("--height", "60")])
def test_inference_bad_numbers(flag, value, tiny_sd15, tmp_path, capsys):
    out = tmp_path / "gen"
    _expect_user_error(inference.main, ["--pretrained_model_name_or_path", str(tiny_sd15), "--prompt", "a dog",
                                        "--output_dir", str(out), flag, value], capsys, out, flag.lstrip("-"))


def test_training_bad_numbers_and_8bit(tiny_sd15, concept_set, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ti_args(tiny_sd15, concept_set, out)
    argv[argv.index("--max_train_steps") + 1] = "0"
    _expect_user_error(train_ti.main, argv, capsys, out, "max_train_steps")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        _expect_user_error(train_ti.main, ti_args(tiny_sd15, concept_set, out, "--use_8bit_adam"), capsys, out,
                           "bitsandbytes")


def test_resume_without_checkpoint(tiny_sd15, concept_set, tmp_path, capsys):
    out = tmp_path / "out"
    _expect_user_error(train_ti.main, ti_args(tiny_sd15, concept_set, out, "--resume_from_checkpoint", "latest"),
                       capsys, out, "no checkpoint")
