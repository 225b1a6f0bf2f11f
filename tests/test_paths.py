"""Paths no other test walks: SDXL resume, stage 3 in two processes, bf16 on CPU through the stages, the prior
preservation loss, and the stage-1 / stage-3 shell wrappers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, REPO, built_once, ti_args
from safetensors.torch import load_file

import train_clif
import train_lora
import train_ti


def _env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            **extra}


def _lora_args(model, data, stage, out, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--stage_dir", str(stage),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--learning_rate", "5e-3",
            "--embedding_learning_rate", "1e-2", "--rank", "4", "--report_to", "none", *extra]


def _same_files(a, b, names) -> None:
    for f in names:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


def _losses(out) -> list[float]:
    return json.loads((out / "run_stats.json").read_text())["losses"]


@pytest.fixture(scope="module")
def ti_sd15(tiny_sd15, concept_set, tmp_path_factory):
    build = lambda out: train_ti.main(ti_args(tiny_sd15, concept_set, out / "sd15", "--max_train_steps", "1"))  # noqa: E731
    return built_once(tmp_path_factory, "paths-ti-sd15", build) / "sd15"


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
    from clif.fixtures.tiny import build_clipseg

    return build_clipseg(tmp_path_factory.mktemp("seg") / "clipseg")


def test_sdxl_stage3_resume_is_bit_identical(tiny_sdxl, concept_set, tmp_path):
    """SDXL (two encoders, time ids), LoRA on UNet and both text encoders: killed at step 2 and resumed = whole run."""
    ti = tmp_path / "ti"
    train_ti.main(ti_args(tiny_sdxl, concept_set, ti, "--max_train_steps", "1"))
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--train_text_encoder_lora", "--random_flip",
             "--lr_scheduler", "cosine"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_lora.main(_lora_args(tiny_sdxl, concept_set, ti, full, *extra))
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    train_lora.main(_lora_args(tiny_sdxl, concept_set, ti, part, *extra, "--resume_from_checkpoint", "latest"))
    _same_files(full, part, ["pytorch_lora_weights.safetensors", "embeddings/redball.safetensors",
                             "embeddings/bluebox.safetensors"])
    assert _losses(full)[2:] == _losses(part)[-2:]
    lora = load_file(str(full / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder_2.") for k in lora) and any(k.startswith("unet.") for k in lora)


@pytest.mark.heavy(20)
def test_stage3_two_processes_match_one(tiny_sd15, concept_set, ti_sd15, tmp_path):
    """Stage 3 in 2 gloo processes (batch 1 each) = 1 process with the same global batch of 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    train_lora.main(_lora_args(tiny_sd15, concept_set, ti_sd15, one, "--max_train_steps", "3", "--random_flip"))
    argv = _lora_args(tiny_sd15, concept_set, ti_sd15, two, "--max_train_steps", "3", "--random_flip")
    argv[argv.index("--train_batch_size") + 1] = "1"
    r = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_lora.py"), *argv],
                       env=_env(ACCELERATE_USE_CPU="true"), check=False, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(_losses(one), _losses(two), rtol=1e-5)
    for f in ("pytorch_lora_weights.safetensors", "embeddings/redball.safetensors"):
        a, b = load_file(str(one / f)), load_file(str(two / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bf16_on_cpu_through_the_three_stages(tiny_sd15, concept_set, segmenter_dir, tmp_path):
    """--mixed_precision bf16 runs stages 1-3 on CPU: frozen weights in bf16, trained rows and LoRA saved in fp32."""
    s1, s2, s3, fp32 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3", tmp_path / "fp32"
    bf16 = ["--mixed_precision", "bf16"]
    train_clif.main(["--pretrained_model_name_or_path", str(tiny_sd15), "--train_data_dir", str(concept_set),
                     "--output_dir", str(s1), "--segmenter", str(segmenter_dir), "--cache_dir", str(tmp_path / "c"),
                     "--report_to", "none", "--num_pairs", "32", "--train_batch_size", "8", "--max_train_steps", "2",
                     *bf16])
    train_ti.main(ti_args(tiny_sd15, concept_set, s2, "--stage_dir", str(s1), "--max_train_steps", "2", *bf16))
    train_lora.main(_lora_args(tiny_sd15, concept_set, s2, s3, *bf16))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train_ti.main(ti_args(tiny_sd15, concept_set, fp32, "--stage_dir", str(s1), "--max_train_steps", "2"))
    for out in (s1, s2, s3):
        assert json.loads((out / "clif_manifest.json").read_text())["args"]["mixed_precision"] == "bf16"
        assert all(np.isfinite(_losses(out)))
        rows = load_file(str(out / "embeddings" / "redball.safetensors"))["<redball>"]
        assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    lora = load_file(str(s3 / "pytorch_lora_weights.safetensors"))
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    assert _losses(s2) != _losses(fp32)  # the UNet really ran in bf16


def test_prior_preservation_adds_the_class_loss(tiny_sd15, concept_set, ti_sd15, tmp_path):
    """The class-image term changes the loss; at weight 0 the run equals one without prior preservation."""
    cls = ["--with_prior_preservation", "--class_prompt", "a photo of a ball", "--class_data_dir",
           str(tmp_path / "class"), "--num_class_images", "2"]
    plain, zero, one = tmp_path / "plain", tmp_path / "zero", tmp_path / "one"
    train_lora.main(_lora_args(tiny_sd15, concept_set, ti_sd15, plain))
    train_lora.main(_lora_args(tiny_sd15, concept_set, ti_sd15, zero, *cls, "--prior_loss_weight", "0"))
    train_lora.main(_lora_args(tiny_sd15, concept_set, ti_sd15, one, *cls, "--prior_loss_weight", "1"))
    assert _losses(zero) == _losses(plain)
    assert all(b > a for a, b in zip(_losses(plain), _losses(one)[:1]))  # same first batch + a positive class term
    _same_files(plain, zero, ["pytorch_lora_weights.safetensors"])
    a = load_file(str(plain / "pytorch_lora_weights.safetensors"))
    b = load_file(str(one / "pytorch_lora_weights.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
