"""Subprocess runs: the shell wrappers through `accelerate launch`, and --help of every script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import HANG_GUARD_S, REPO


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return env


@pytest.mark.heavy(15)
def test_run_train_clif_sh_official_defaults(tiny_sd15, concept_set, tmp_path):
    """The stage-1 wrapper runs with the official settings: batch 2048 in gradient-cached chunks, lr 1e-4, wd 1e-2."""
    out = tmp_path / "clif"
    env = {**_env(), "MODEL": str(tiny_sd15), "DATA": str(concept_set), "OUT": str(out), "COMMON": "",
           "LAUNCH": "--num_processes 1 --num_machines 1 --dynamo_backend no"}
    r = subprocess.run(["bash", str(REPO / "run_train_clif.sh"), "--mixed_precision", "no", "--max_train_steps", "1",
                        "--num_pairs", "256", "--cache_dir", str(tmp_path / "cache"), "--report_to", "none"],
                       env=env, check=False, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((out / "clif_manifest.json").read_text())["args"]
    assert (a["train_batch_size"], a["text_chunk_size"], a["learning_rate"], a["adam_weight_decay"]) == \
        (2048, 256, 1e-4, 1e-2)
    assert a["lr_scheduler"] == "constant" and a["use_8bit_adam"] is False  # no CUDA here
    assert json.loads((out / "confusion.json").read_text())["held_out"]["views"]


def test_parser_defaults_follow_the_official_code():
    import train_clif
    import train_lora
    import train_ti

    req = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", "o"]
    a = train_clif.build_parser().parse_args(req)
    assert (a.train_batch_size, a.learning_rate, a.lr_scheduler, a.adam_weight_decay, a.use_8bit_adam) == \
        (2048, 1e-4, "constant", 1e-2, None)  # None: 8-bit AdamW when bitsandbytes and CUDA exist
    for script in (train_ti, train_lora):
        a = script.build_parser().parse_args([*req, "--stage_dir", "s"])
        assert (a.learning_rate, a.train_batch_size * a.gradient_accumulation_steps) == (2e-4, 64)
    assert (a.rank, a.lora_alpha, a.embedding_learning_rate) == (16, None, None)  # alpha = rank, emb lr = lr


@pytest.mark.parametrize("script", ["train_clif", "train_ti", "train_lora", "inference", "evaluate"])
def test_help_explains_every_flag(script):
    """Every flag of every script has a help text of its own (argparse's actions, --help included)."""
    import argparse
    import importlib

    parser = importlib.import_module(script).build_parser()
    flags = [a for a in parser._actions if a.option_strings]
    assert len(flags) > 5
    undocumented = [a.option_strings for a in flags if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert undocumented == []
    r = subprocess.run([sys.executable, str(REPO / f"{script}.py"), "--help"], check=False, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0
    for a in flags:
        assert a.option_strings[0] in r.stdout, a.option_strings


def test_bad_flag_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "inference.py"), "--pretrained_model_name_or_path", "x",
                        "--output_dir", str(tmp_path / "o"), "--num_inference_steps", "0"],
                       check=False, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "must be > 0" in r.stderr


@pytest.mark.heavy(20)
def test_stage2_two_processes_match_one(tiny_sd15, concept_set, tmp_path):
    """Stage 2 in 2 gloo processes (batch 1 each) = 1 process with the same global batch of 2."""
    from conftest import ti_args
    from safetensors.torch import load_file

    import train_ti

    one, two = tmp_path / "one", tmp_path / "two"
    train_ti.main(ti_args(tiny_sd15, concept_set, one, "--max_train_steps", "3", "--random_flip"))
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    argv = ti_args(tiny_sd15, concept_set, two, "--max_train_steps", "3", "--random_flip")
    argv[argv.index("--train_batch_size") + 1] = "1"
    r = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_ti.py"), *argv],
                       env=env, check=False, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    l1 = json.loads((one / "run_stats.json").read_text())["losses"]
    l2 = json.loads((two / "run_stats.json").read_text())["losses"]
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
    a = load_file(str(one / "embeddings" / "redball.safetensors"))["<redball>"]
    b = load_file(str(two / "embeddings" / "redball.safetensors"))["<redball>"]
    assert (a - b).abs().max() < 1e-5
