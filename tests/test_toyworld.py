"""The toy world: generator determinism, masks and captions; pretraining at tiny size feeds every stage; the
experiment pipeline end to end at minimal steps; the committed world (when present) and its oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clif.toyworld.world import Obj, Scene, random_scene, render, render_batch

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "pretrained" / "toyworld" / "model"


def test_generator_is_deterministic_and_seed_dependent():
    a_img, a_cap = render_batch(3, 8)
    b_img, b_cap = render_batch(3, 8)
    c_img, c_cap = render_batch(4, 8)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap


def test_masks_match_objects_and_captions_name_what_is_drawn():
    scene = Scene(
        (Obj("ball", "red", slot="left"), Obj("box", "blue", "stripes", "white", slot="right")),
        background=(200, 200, 200),
    )
    img, masks = render(scene, 32)
    a = np.asarray(img).astype(int)
    left, right = (np.asarray(m) > 0 for m in masks)
    assert left[:, :16].sum() > 0.95 * left.sum() and right[:, 16:].sum() > 0.95 * right.sum()
    # pixels under the left mask are red, under the right mask blue or white (stripes), outside: background
    core = np.asarray(masks[0].resize((32, 32))) > 0
    assert np.abs(a[core].mean(0) - (220, 40, 40)).max() < 30
    rmean = a[right].mean(0)
    assert rmean[2] > rmean[0] + 40  # blue dominates over red
    assert np.abs(a[~(left | right)].mean(0) - 200).max() < 10
    assert scene.caption() == "a red ball on the left and a blue box with white stripes on the right"


def test_random_captions_state_position_of_each_drawn_object():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = random_scene(rng)
        cap = s.caption()
        for o in s.objects:
            assert o.phrase() in cap and o.cls in cap and o.color in cap
            if len(s.objects) == 2 or o.slot != "center":
                assert f"{o.phrase()} on the {o.slot}" in cap
        _, masks = render(s, 32)
        assert len(masks) == len(s.objects) and all(np.asarray(m).any() for m in masks)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    """The pretraining command at its test preset (2 steps per part), run in-process."""
    from clif.toyworld.__main__ import main

    out = tmp_path_factory.mktemp("tw") / "world"
    main(["pretrain", "--out", str(out), "--preset", "test", "--no_grids", "--threads", "1"])
    return out


def test_pretrain_writes_a_pipeline_with_paired_clip(tiny_world):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_world, safety_checker=None)
    clip = CLIPModel.from_pretrained(tiny_world / "paired_clip")
    # the diffusion text encoder *is* the CLIP text tower
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, clip.text_model.state_dict()[k]), k
    stats = json.loads((tiny_world / "pretrain_stats.json").read_text())
    assert {"clip_retrieval_top1_heldout", "vae_heldout_mse", "unet_final_loss"} <= set(stats)
    # resuming a finished run trains nothing and rewrites the same weights
    from clif.toyworld.__main__ import main

    before = load_file(str(tiny_world / "unet" / "diffusion_pytorch_model.safetensors"))
    main(["pretrain", "--out", str(tiny_world), "--preset", "test", "--no_grids", "--threads", "1"])
    after = load_file(str(tiny_world / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_experiment_pipeline_end_to_end(tiny_world, tmp_path):
    """Every stage, inference and evaluate.py accept the world; the table is written (numbers not asserted)."""
    from clif.toyworld.__main__ import main

    out = tmp_path / "exp"
    flags = "--seeds 0 --clif_steps 2 --ti_steps 2 --lora_steps 2 --images_per_prompt 1 --inference_steps 2"
    flags += " --oracle_steps 2 --oracle_crops 64 --methods ti clif"
    main(["experiment", *flags.split(" "), "--base", str(tiny_world), "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == {"ti", "clif"}  # ti_lora is ti + the lora stage, both run here already
    for m in ("ti", "clif"):
        row = res["per_seed"][m][0]
        assert row["n_images"] == 4 and 0 <= row["oracle_confusion"] <= 1
    assert (out / "seed0" / "clif-ti-lora" / "clif_manifest.json").exists()
    assert (out / "results.md").read_text().count("|") > 10 and (out / "side_by_side.png").exists()


@pytest.mark.skipif(
    not (COMMITTED.is_dir() and (REPO / "pretrained" / "toyworld" / "oracle" / "oracle.safetensors").is_file()),
    reason="no committed toy world (pretrained/toyworld/model) and oracle (pretrained/toyworld/oracle)",
)
def test_committed_world_loads_and_oracle_is_accurate():
    import torch
    from diffusers import StableDiffusionPipeline

    from clif.toyworld.experiment import LOOKALIKES
    from clif.toyworld.oracle import half_crops, train_oracle

    pipe = StableDiffusionPipeline.from_pretrained(COMMITTED, safety_checker=None)
    img = pipe("a red ball", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert img.images.shape[1:3] == (pipe.unet.config.sample_size * 4,) * 2
    oracle = train_oracle(LOOKALIKES, 32, REPO / "pretrained" / "toyworld" / "oracle")  # loads the committed weights
    x, y = half_crops(LOOKALIKES, 300, 32, seed=12345)
    pred = oracle.predict(x)
    names = [*oracle.names, "other"]
    assert np.mean([p == names[t] for p, t in zip(pred, y)]) >= 0.95


def test_oracle_scores_follow_the_confusion_definition(tmp_path):
    """Confused = both halves the same concept, or one half neither; correct/swapped follow the prompt's order."""
    from PIL import Image

    from clif.toyworld.experiment import oracle_scores

    ab, ba = "a <ball_a> on the left and a <ball_b> on the right", "a <ball_b> on the left and a <ball_a> on the right"
    cases = [
        (ab, ("ball_a", "ball_b")),
        (ab, ("ball_a", "ball_a")),
        (ab, ("ball_b", "other")),
        (ba, ("ball_b", "ball_a")),
        (ba, ("ball_a", "ball_b")),
    ]
    for i, (prompt, _) in enumerate(cases):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.json").write_text(json.dumps({"prompt": prompt}))

    class Stub:
        answers = iter(got for _, got in cases)

        def halves(self, img):
            return next(self.answers)

    s = oracle_scores(Stub(), tmp_path)
    assert [r["confused"] for r in s["rows"]] == [False, True, True, False, False]
    assert (s["oracle_confusion"], s["oracle_correct"], s["oracle_swapped"]) == (0.4, 0.4, 0.2)
