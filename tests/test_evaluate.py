"""evaluate.py: the metric formulas, batch invariance, the confusion metric on constructed cases, the full chain."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SHARED_DATA, colour_histogram, needs_data, run_cli, ti_args
from PIL import Image

import evaluate
import inference
import train_ti
from clif.concepts import load_concept_set
from clif.eval import metrics
from clif.eval.backbones import Backbone
from clif.eval.evaluation import Item, score_folder, summarize

DB = SHARED_DATA / "dreambench-mini"
needs_db = needs_data("dreambench-mini")


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory):
    from clif.fixtures.tiny import build_openclip

    return build_openclip(tmp_path_factory.mktemp("oc") / "oc")


def _set(root, subjects):
    spec = [{"name": n, "token": f"<{n}>", "initializer": c, "class": c, "images": str(DB / n)} for n, c in subjects]
    root.mkdir(parents=True, exist_ok=True)
    (root / "concepts.json").write_text(json.dumps({"concepts": spec}))
    return root


def test_clipscore_formula_and_replacement():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[1.0, 3**0.5], [-1.0, 0.0], [0.0, 5.0]])  # cos 0.5, -1, 1
    score, cos = metrics.clip_score(img, txt)
    torch.testing.assert_close(cos, torch.tensor([0.5, -1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(score, torch.tensor([1.25, 0.0, 2.5], dtype=torch.float64))
    assert metrics.replace_tokens("a <dog2> <dog2>_1 next to <cat>", {"<dog2>": "dog", "<cat>": "cat"}) == \
        "a dog next to cat"
    assert metrics.tokens_in("a photo of <b> on the left and <a> on the right", ["<a>", "<b>"]) == ["<b>", "<a>"]


@needs_db
def test_self_reference_alignment_and_batch_invariance(openclip_dir, tmp_path):
    concepts = _set(tmp_path / "set", [("teapot", "teapot"), ("dog2", "dog")])
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    # the only reference of a one-image concept: the very same picture
    one = _set(tmp_path / "one", [])
    (one / "img").mkdir()
    shutil.copy(DB / "vase" / "00.jpg", one / "img" / "00.jpg")
    (one / "concepts.json").write_text(json.dumps({"concepts": [
        {"name": "vase", "token": "<vase>", "initializer": "vase", "images": "img"}]}))
    Image.open(DB / "vase" / "00.jpg").convert("RGB").save(imgs / "a.png")
    (imgs / "prompts.json").write_text(json.dumps({"a.png": "a photo of <vase>"}))
    res = evaluate.main(["--images", str(imgs), "--concepts", str(one), "--clip_model", f"local-dir:{openclip_dir}",
                         "--detector", "none", "--output_dir", str(tmp_path / "e0")])
    assert abs(res["imgs"]["summary"]["image_alignment"] - 1.0) < 1e-5

    many = tmp_path / "many"
    many.mkdir()
    prompts = {}
    for i, p in enumerate(sorted((DB / "teapot").glob("*.jpg")) + sorted((DB / "dog2").glob("*.jpg"))):
        Image.open(p).convert("RGB").save(many / f"{i}.png")
        prompts[f"{i}.png"] = "a photo of <teapot> on the left and <dog2> on the right"
    (many / "prompts.json").write_text(json.dumps(prompts))
    out = {}
    for bs in ("1", "3", "32"):
        out[bs] = evaluate.main(["--images", str(many), "--concepts", str(concepts), "--clip_model",
                                 f"local-dir:{openclip_dir}", "--detector", "none", "--batch_size", bs,
                                 "--output_dir", str(tmp_path / f"e{bs}")])["many"]["summary"]
    for bs in ("3", "32"):
        for k in ("text_alignment", "text_cosine", "image_alignment", "attendance", "confusion_rate"):
            assert abs(out[bs][k] - out["1"][k]) < 1e-6, (k, bs)
    assert (tmp_path / "e1" / "metrics.csv").read_text().count("\n") == 1 + 1 + 1  # header, ALL, one prompt
    assert Image.open(tmp_path / "e1" / "metrics.png").width > 100


@needs_db
def test_confusion_metric_on_composites(openclip_dir, tmp_path):
    concepts = load_concept_set(_set(tmp_path / "set", [("teapot", "teapot"), ("dog2", "dog")]))
    hist_refs = {c.name: colour_histogram([Image.open(p) for p in c.images]) for c in concepts}

    def side_by_side(a, b):
        im = Image.new("RGB", (256, 128))
        im.paste(Image.open(a).convert("RGB").resize((128, 128)), (0, 0))
        im.paste(Image.open(b).convert("RGB").resize((128, 128)), (128, 0))
        return im

    prompt = "a photo of <teapot> on the left and <dog2> on the right"
    cases = {"right": (DB / "teapot" / "01.jpg", DB / "dog2" / "01.jpg"),
             "twice": (DB / "dog2" / "01.jpg", DB / "dog2" / "02.jpg")}
    items = []
    for name, (a, b) in cases.items():
        side_by_side(a, b).save(tmp_path / f"{name}.png")
        items.append(Item(tmp_path / f"{name}.png", prompt))
    items.append(Item(tmp_path / "right.png", "<teapot> and <dog2> together"))  # no layout words, no detector
    backbone = Backbone(f"local-dir:{openclip_dir}", None, "cpu")
    refs = {c.name: backbone.images([Image.open(p).convert("RGB") for p in c.images], 4) for c in concepts}
    rows = score_folder(items, concepts, refs, backbone, batch_size=4, margin=0.0, feature_fn=colour_histogram,
                        match_refs=hist_refs)
    assert rows[0]["found"] and not rows[0]["confused"]  # each half matches its own subject
    assert rows[1]["found"] and rows[1]["confused"]  # the same subject twice: confusion
    assert rows[2]["found"] is False  # nothing to find the instances with
    s = summarize(rows)
    assert s["pair_images"] == 3 and s["attendance"] == pytest.approx(2 / 3) and s["confusion_rate"] == 0.5


def test_full_chain_prompt_sets_to_table(tiny_sd15, concept_set, openclip_dir, tmp_path):
    ti = tmp_path / "ti"
    train_ti.main(ti_args(tiny_sd15, concept_set, ti, "--max_train_steps", "2"))
    for kind in ("single", "pair"):
        inference.main(["--pretrained_model_name_or_path", str(tiny_sd15), "--stage_dir", str(ti), "--prompt_set",
                        kind, "--num_images_per_prompt", "1", "--num_inference_steps", "2",
                        "--output_dir", str(tmp_path / kind)])
    n_single = len([p for p in (tmp_path / "single").glob("*.png") if p.name != "contact_sheet.png"])
    assert n_single == 2 * 22  # 22 templates x 2 concepts
    res = evaluate.main(["--images", str(tmp_path / "single"), str(tmp_path / "pair"), "--labels", "single", "pair",
                         "--concepts", str(concept_set), "--clip_model", f"local-dir:{openclip_dir}", "--detector",
                         "none", "--output_dir", str(tmp_path / "eval")])
    assert res["pair"]["summary"]["pair_images"] == 13 and res["single"]["summary"]["pair_images"] == 0
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| single | 44 |" in table and "| pair | 13 |" in table


def test_evaluate_bad_inputs(openclip_dir, concept_set, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--concepts", str(concept_set), "--clip_model", f"local-dir:{openclip_dir}", "--detector", "none",
            "--output_dir", str(out)]
    cases = [(["--images", str(empty), *base], "no images")]
    nosidecar = tmp_path / "nosidecar"
    nosidecar.mkdir()
    Image.new("RGB", (32, 32)).save(nosidecar / "x.png")
    cases.append((["--images", str(nosidecar), *base], "has no prompt"))
    plain = tmp_path / "plain"
    (plain / "thing").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(plain / "thing" / "a.png")
    cases.append((["--images", str(nosidecar), *base[:0], "--concepts", str(plain), *base[2:]], "no class word"))
    good = tmp_path / "good"
    good.mkdir()
    Image.new("RGB", (32, 32)).save(good / "x.png")
    (good / "prompts.json").write_text(json.dumps({"x.png": "a photo of <redball>"}))
    cases.append((["--images", str(good), *base[:2], "--clip_model", "ViT-Nope-99", *base[4:]],
                  "unknown open_clip model"))
    for argv, needle in cases:
        code, err = run_cli(evaluate.main, argv, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_detector_and_dino_paths(tiny_sd15, concept_set, openclip_dir, tmp_path):
    """OWLv2 boxes (tiny random detector) and DINO alignment (tiny random ViT) run through evaluate.py."""
    from clif.fixtures.tiny import build_dino, build_dinov2, build_owlv2

    ti = tmp_path / "ti"
    train_ti.main(ti_args(tiny_sd15, concept_set, ti, "--max_train_steps", "1"))
    inference.main(["--pretrained_model_name_or_path", str(tiny_sd15), "--stage_dir", str(ti), "--prompt_set", "pair",
                    "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "g")])
    res = evaluate.main(["--images", str(tmp_path / "g"), "--concepts", str(concept_set), "--clip_model",
                         f"local-dir:{openclip_dir}", "--detector", str(build_owlv2(tmp_path / "owl")),
                         "--detector_threshold", "0", "--dino", str(build_dino(tmp_path / "dino")),
                         "--dc_model", str(build_dinov2(tmp_path / "dv2")),  # D&C: on with a detector
                         "--output_dir", str(tmp_path / "e")])["g"]
    assert {r["instances"] for r in res["rows"]} == {"detector"}  # threshold 0: boxes for every image
    assert -1 <= res["summary"]["dino_alignment"] <= 1
    assert all(len(r["dino_alignment"]) == 2 for r in res["rows"])
    assert all("dc" in r for r in res["rows"]) and res["summary"]["dc_images"] == len(res["rows"])
