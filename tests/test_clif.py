"""Stage 1: the pair builder, the contrastive mechanism, multi-process equivalence, the whole chain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, REPO, SHARED_DATA, needs_data, run_cli, stock_pipeline, ti_args
from PIL import Image
from safetensors.torch import load_file

import inference
import train_clif
import train_lora
import train_ti
from clif.concepts import load_concept_set
from clif.contrastive.augment import PairBuilder
from clif.fixtures.synthetic import CONCEPTS, write_concept_set


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
    from clif.fixtures.tiny import build_clipseg

    return build_clipseg(tmp_path_factory.mktemp("seg") / "clipseg")


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """4 synthetic concepts (distinct shapes/colours/textures), with masks and a part mask each."""
    root = write_concept_set(tmp_path_factory.mktemp("four") / "set", n_concepts=4, n_images=4, seed=3)
    spec = json.loads((root / "concepts.json").read_text())
    for c in spec["concepts"]:
        c["parts"] = ["top"]
        for m in (root / "masks" / c["name"]).glob("*.png"):
            if "__" in m.name:
                continue
            a = np.asarray(Image.open(m)).copy()
            ys = np.nonzero(a.any(axis=1))[0]
            a[(ys.min() + ys.max()) // 2:] = 0  # top half of the concept
            Image.fromarray(a).save(m.with_name(f"{m.stem}__top.png"))
    (root / "concepts.json").write_text(json.dumps(spec))
    return root


def clif_args(model, data, out, seg, cache, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--segmenter", str(seg), "--cache_dir", str(cache), "--report_to", "none", "--num_pairs", "64",
            "--train_batch_size", "8", "--max_train_steps", "3", *extra]


def one_template(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of {}\n")
    return path


def test_builder_layout_counts_and_determinism(four):
    concepts = load_concept_set(four)
    builder = PairBuilder(concepts, size=64, segmenter=None)
    pairs = builder.build(50, {"global": 0.4, "region": 0.2, "mix": 0.4}, seed=5)
    counts = {k: sum(p.kind == k for p in pairs) for k in ("global", "region", "mix")}
    assert counts == {"global": 20, "region": 10, "mix": 20}
    again = builder.build(50, {"global": 0.4, "region": 0.2, "mix": 0.4}, seed=5)
    assert [p.caption for p in pairs] == [p.caption for p in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(pairs, again))
    assert [p.caption for p in builder.build(50, {"global": 0.4, "region": 0.2, "mix": 0.4}, seed=6)] != \
        [p.caption for p in pairs]
    colours = {name: np.array(col) for name, _, col, _ in CONCEPTS}
    for p in pairs:
        if p.kind == "region":
            assert p.caption.endswith("'s top")
        if p.kind != "mix":
            continue
        (left, lbox), (right, rbox) = p.layout
        assert lbox[2] <= 32 <= rbox[0]  # the left concept is in the left half
        assert p.key == (f"<{left}>", f"<{right}>")
        assert "left" in p.caption and p.caption.index(f"<{left}>") < p.caption.index(f"<{right}>")
        for name, box in ((left, lbox), (right, rbox)):
            if name == "yellowrug":  # striped: its colour is half the pixels
                continue
            px = np.asarray(p.image.crop(box)).reshape(-1, 3).astype(int)
            near = np.abs(px - colours[name]).max(axis=1) < 40  # the concept's own colour is there
            assert near.mean() > 0.15, (name, near.mean())


@needs_data("break-a-scene-mini")
def test_real_masks_are_respected(tmp_path):
    scene = SHARED_DATA / "break-a-scene-mini" / "bear"
    root = tmp_path / "set"
    (root / "images" / "bear").mkdir(parents=True)
    (root / "masks" / "bear").mkdir(parents=True)
    shutil.copy(scene / "img.jpg", root / "images" / "bear" / "img.jpg")
    shutil.copy(scene / "mask0.png", root / "masks" / "bear" / "img.png")
    (root / "concepts.json").write_text(json.dumps({"concepts": [{"name": "bear", "token": "<bear>",
                                                                  "initializer": "bear"}]}))
    builder = PairBuilder(load_concept_set(root), size=128, segmenter=None)
    piece = builder.wholes[0][0]
    mask = np.asarray(Image.open(scene / "mask0.png").convert("L")) >= 128
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    alpha = np.asarray(piece.image)[..., 3] > 0
    assert np.array_equal(alpha, crop)  # exactly the user's mask pixels, nothing else
    rgb = np.asarray(Image.open(scene / "img.jpg").convert("RGB"))[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert np.array_equal(np.asarray(piece.image)[..., :3][crop], rgb[crop])


def test_mechanism_confusion_drops(tiny_sd15, four, segmenter_dir, tmp_path):
    """Only the token rows train, against the frozen paired CLIP: retrieval goes from near chance to >= 0.9."""
    out = tmp_path / "clif"
    train_clif.main(clif_args(tiny_sd15, four, out, segmenter_dir, tmp_path / "cache", "--num_pairs", "200",
                              "--train_batch_size", "32", "--max_train_steps", "400", "--learning_rate", "5e-2",
                              "--global_ratio", "0.7", "--region_ratio", "0", "--mix_ratio", "0.3",
                              "--adam_weight_decay", "0", "--caption_templates", str(one_template(tmp_path))))
    conf = json.loads((out / "confusion.json").read_text())
    print({k: (conf[k]["before"]["accuracy"], conf[k]["after"]["accuracy"]) for k in ("held_out", "train_views")})
    for k in ("held_out", "train_views"):
        assert conf[k]["before"]["accuracy"] <= 0.5  # chance is 0.25 for 4 concepts
        assert conf[k]["after"]["accuracy"] >= 0.9, conf[k]["after"]
    assert (out / "confusion.png").exists()
    manifest = json.loads((out / "clif_manifest.json").read_text())
    assert manifest["stage"] == "clif" and len(manifest["concepts"]) == 4


@pytest.mark.heavy(20)
def test_two_processes_same_loss_as_one(tiny_sd15, four, segmenter_dir, tmp_path):
    """1 process, batch 8 in one pass = 2 processes, batch 4 each in gradient-cached chunks of 3 and 1."""
    base = clif_args(tiny_sd15, four, None, segmenter_dir, tmp_path / "cache", "--max_train_steps", "3",
                     "--mixed_precision", "no")
    one, two = tmp_path / "one", tmp_path / "two"
    train_clif.main([*base, "--output_dir", str(one), "--train_batch_size", "8"])
    # On a machine without GPUs, --multi_gpu alone starts 2 independent single processes; ACCELERATE_USE_CPU
    # makes them one gloo group (DistributedType.MULTI_CPU).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    argv = [a if a != "None" else str(two) for a in base]
    r = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_clif.py"), *argv,
                        "--output_dir", str(two), "--train_batch_size", "4", "--text_chunk_size", "3"], env=env, check=False,
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    l1 = json.loads((one / "run_stats.json").read_text())["losses"]
    l2 = json.loads((two / "run_stats.json").read_text())["losses"]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    a = load_file(str(one / "embeddings" / "redball.safetensors"))["<redball>"]
    b = load_file(str(two / "embeddings" / "redball.safetensors"))["<redball>"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_chain_clif_ti_lora_inference(family, tiny_models, concept_set, segmenter_dir, tmp_path):
    model = tiny_models[family]
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    train_clif.main(clif_args(model, concept_set, s1, segmenter_dir, tmp_path / "cache", "--learning_rate", "1e-1"))
    train_ti.main(ti_args(model, concept_set, s2, "--stage_dir", str(s1), "--max_train_steps", "2"))
    train_lora.main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(concept_set),
                     "--stage_dir", str(s2), "--output_dir", str(s3), "--resolution", "64", "--max_train_steps", "2",
                     "--gradient_accumulation_steps", "1", "--report_to", "none"])
    r1 = load_file(str(s1 / "embeddings" / "redball.safetensors"))
    init = json.loads((s1 / "clif_manifest.json").read_text())["concepts"][0]
    assert init["initializer"] == "ball" and all(torch.isfinite(v).all() for v in r1.values())
    assert json.loads((s3 / "clif_manifest.json").read_text())["inputs"] == [str(s2.resolve())]
    paths = inference.main(["--pretrained_model_name_or_path", str(model), "--stage_dir", str(s3), "--prompt",
                            "a <redball> on the left and a <bluebox> on the right", "--regions", "none", "--num_images_per_prompt", "1",
                            "--num_inference_steps", "2", "--output_dir", str(tmp_path / "gen")])
    assert Image.open(paths[0]).size == (64, 64)


def test_clif_bad_inputs(tiny_sd15, concept_set, segmenter_dir, tmp_path, capsys):
    out = tmp_path / "out"
    one = tmp_path / "one"
    shutil.copytree(concept_set, one)
    spec = json.loads((one / "concepts.json").read_text())
    spec["concepts"] = spec["concepts"][:1]
    (one / "concepts.json").write_text(json.dumps(spec))
    code, err = run_cli(train_clif.main, clif_args(tiny_sd15, one, out, segmenter_dir, tmp_path / "c"), capsys)
    assert code == 2 and "at least two concepts" in err and len(err.strip().splitlines()) == 1
    black = tmp_path / "black"
    shutil.copytree(concept_set, black)
    m = black / "masks" / "redball" / "01.png"
    Image.new("L", Image.open(m).size, 0).save(m)
    code, err = run_cli(train_clif.main, clif_args(tiny_sd15, black, out, segmenter_dir, tmp_path / "c"), capsys)
    assert code == 2 and "no usable mask" in err and "01.png" in err
    assert not out.exists()
    code, err = run_cli(train_clif.main, clif_args(tiny_sd15, concept_set, out, segmenter_dir, tmp_path / "c",
                                                   "--clip_model", str(tmp_path / "no_clip")), capsys)
    assert code == 2 and f"--clip_model {tmp_path / 'no_clip'} does not exist" in err and not out.exists()


@needs_data("dreambench-mini")
def test_segmenter_masks_cached_and_common_concepts_generated(tiny_sd15, segmenter_dir, tmp_path):
    """No user masks: CLIPSeg masks are computed once and cached; --common_words images are generated and used."""
    root = tmp_path / "set"
    root.mkdir()
    spec = [{"name": n, "token": f"<{n}>", "initializer": c, "images": str(SHARED_DATA / "dreambench-mini" / n)}
            for n, c in (("dog2", "dog"), ("teapot", "teapot"))]
    (root / "concepts.json").write_text(json.dumps({"concepts": spec}))
    cache = tmp_path / "cache"
    out = tmp_path / "s1"
    train_clif.main(clif_args(tiny_sd15, root, out, segmenter_dir, cache, "--common_words", "chef",
                              "--num_common_images", "2", "--allow_word_names"))  # 'teapot' is a CLIP word
    masks = sorted((cache / "masks").glob("*.png"))
    assert len(masks) == 6 + 5 + 2  # one per dog2 (6) and teapot (5) photo, and per generated chef image (2)
    assert len(list((cache / "common" / "chef").glob("*.png"))) == 2
    stamp = [m.stat().st_mtime_ns for m in masks]
    from clif.contrastive.common_concepts import common_images
    from clif.masks import Segmenter

    builder = PairBuilder(load_concept_set(root), size=64, segmenter=Segmenter(str(segmenter_dir), cache / "masks"),
                          common=common_images(root, ["chef"], cache))
    assert [m.stat().st_mtime_ns for m in masks] == stamp  # served from the cache
    pairs = builder.build(40, {"global": 1.0, "region": 0.0, "mix": 0.0}, seed=0)
    assert any("a chef" in p.caption for p in pairs)
    assert all(p.caption.count("<") == 1 for p in pairs)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.heavy(12)
def test_stage1_text_encoder_lora_is_carried(family, tiny_models, concept_set, segmenter_dir, tmp_path):
    """--train_text_encoder lora: stage 2 trains against it and passes it on; stage 3 continues it;
    stock diffusers (load_textual_inversion + load_lora_weights) reproduces inference.py exactly."""
    model = tiny_models[family]
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    train_clif.main(clif_args(model, concept_set, s1, segmenter_dir, tmp_path / "c", "--train_text_encoder", "lora",
                              "--text_encoder_lr", "1e-2", "--learning_rate", "1e-1"))
    lora1 = load_file(str(s1 / "pytorch_lora_weights.safetensors"))
    assert lora1 and all(k.startswith("text_encoder") for k in lora1)
    assert any(k.startswith("text_encoder_2.") for k in lora1) == (family == "sdxl")
    train_ti.main(ti_args(model, concept_set, s2, "--stage_dir", str(s1), "--max_train_steps", "2"))
    lora2 = load_file(str(s2 / "pytorch_lora_weights.safetensors"))
    assert lora2.keys() == lora1.keys() and all(torch.equal(lora1[k], lora2[k]) for k in lora1)  # frozen, carried
    train_lora.main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(concept_set),
                     "--stage_dir", str(s2), "--output_dir", str(s3), "--resolution", "64", "--max_train_steps", "2",
                     "--gradient_accumulation_steps", "1", "--report_to", "none", "--train_text_encoder_lora",
                     "--learning_rate", "1e-2"])
    lora3 = load_file(str(s3 / "pytorch_lora_weights.safetensors"))
    assert set(lora1) <= set(lora3) and any(k.startswith("unet.") for k in lora3)
    assert not all(torch.equal(lora1[k], lora3[k]) for k in lora1)  # the text LoRA kept training
    for stage in (s2, s3):
        prompt = "a <redball> next to a <bluebox>"
        paths = inference.main(["--pretrained_model_name_or_path", str(model), "--stage_dir", str(stage), "--prompt",
                                prompt, "--regions", "none", "--num_images_per_prompt", "1", "--num_inference_steps", "3",
                                "--output_dir", str(tmp_path / f"gen-{stage.name}")])
        pipe = stock_pipeline(model, family, stage)
        img = pipe([prompt], generator=[torch.Generator("cpu").manual_seed(0)], num_inference_steps=3, height=64,
                   width=64).images[0]
        assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(img))


@pytest.mark.parametrize("chunk", [None, "3"])
def test_stage1_resume_is_bit_identical(chunk, tiny_sd15, concept_set, segmenter_dir, tmp_path):
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_scheduler", "cosine", "--learning_rate",
             "1e-1", *(["--text_chunk_size", chunk] if chunk else [])]
    full, part = tmp_path / "full", tmp_path / "part"
    train_clif.main(clif_args(tiny_sd15, concept_set, full, segmenter_dir, tmp_path / "c", *extra))
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    train_clif.main(clif_args(tiny_sd15, concept_set, part, segmenter_dir, tmp_path / "c", *extra,
                              "--resume_from_checkpoint", "latest"))
    for n in ("redball", "bluebox"):
        a = load_file(str(full / "embeddings" / f"{n}.safetensors"))
        b = load_file(str(part / "embeddings" / f"{n}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((full / "confusion.json").read_text()) == json.loads((part / "confusion.json").read_text())
