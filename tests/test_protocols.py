"""--protocol customconcept101 (clif/eval/protocols.py): the settings, Custom Diffusion's image transforms, the flag checks,
and the whole evaluate.py path on tiny models standing in for theirs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

import evaluate
from clif.eval import metrics, protocols


def test_settings_are_custom_diffusions():
    s = protocols.CUSTOMCONCEPT101
    assert (s["clip_model"], s["clip_pretrained"], s["dino"]) == ("ViT-B-32", "openai", "facebook/dino-vits16")
    assert (s["clip_resize"], s["clip_crop"], s["dino_resize"], s["dino_crop"]) == (224, 224, 256, 224)
    assert s["caption_prefix"] == "" and s["clipscore_weight"] == 2.5
    # our CLIPScore is theirs: w * max(cos, 0) with w = 2.5, no prefix added to the caption
    score, _ = metrics.clip_score(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [-1.0, 0.0]]))
    torch.testing.assert_close(score, s["clipscore_weight"] * torch.tensor([0.96, 0.0], dtype=torch.float64))


def test_dino_transform_resizes_the_short_side_then_centre_crops():
    # 600 x 300 white, the leftmost 100 columns green: resize to 512 x 256, crop columns 144..368 -> no green left
    im = Image.new("RGB", (600, 300), (255, 255, 255))
    im.paste(Image.new("RGB", (100, 300), (0, 255, 0)), (0, 0))
    t = protocols.CDTransform(256, 224, protocols.IMAGENET_MEAN, protocols.IMAGENET_STD)
    x = t(im)
    assert x.shape == (3, 224, 224)
    white = (1 - torch.tensor(protocols.IMAGENET_MEAN)) / torch.tensor(protocols.IMAGENET_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), white, atol=1e-4, rtol=0)
    # a squash to 224 x 224 (the transformers processor's way) would keep a green band
    c = protocols.clip_transform(protocols.CUSTOMCONCEPT101)(Image.new("RGB", (50, 80), (128, 128, 128)))
    grey = (128 / 255 - torch.tensor(protocols.CLIP_MEAN)) / torch.tensor(protocols.CLIP_STD)
    assert c.shape == (3, 224, 224)
    torch.testing.assert_close(c[:, 100, 100], grey, atol=1e-4, rtol=0)


def test_resolve_takes_over_defaults_and_refuses_contradictions():
    from argparse import Namespace

    from clif.errors import UserError

    defaults = {"clip_model": "ViT-B-32", "clip_pretrained": "openai", "dino": None}
    got = protocols.resolve("customconcept101", Namespace(**defaults), defaults)
    assert got["dino"] == "facebook/dino-vits16" and got is not protocols.CUSTOMCONCEPT101
    assert protocols.resolve(None, Namespace(**defaults), defaults) is None
    same = protocols.resolve("customconcept101", Namespace(**{**defaults, "dino": "facebook/dino-vits16"}), defaults)
    assert same["dino"] == "facebook/dino-vits16"
    for flag, value in [("clip_model", "ViT-L-14"), ("clip_pretrained", "laion2b"), ("dino", "facebook/dino-vitb8")]:
        with pytest.raises(UserError, match=f"fixes --{flag}"):
            protocols.resolve("customconcept101", Namespace(**{**defaults, flag: value}), defaults)


def _self_reference_set(tmp_path):
    """One concept whose only reference is the generated image itself, and that image with its prompt."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    (tmp_path / "set" / "img").mkdir(parents=True)
    im.save(tmp_path / "set" / "img" / "00.png")
    (tmp_path / "set" / "concepts.json").write_text(json.dumps({"concepts": [
        {"name": "thing", "token": "<thing>", "initializer": "toy", "images": "img"}]}))
    (tmp_path / "imgs").mkdir()
    im.save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "prompts.json").write_text(json.dumps({"a.png": "a photo of <thing>"}))
    return tmp_path / "set", tmp_path / "imgs"


def test_evaluate_protocol_end_to_end_on_tiny_models(tmp_path, monkeypatch):
    from clif.fixtures.tiny import build_dino, build_openclip

    oc, dino = build_openclip(tmp_path / "oc"), build_dino(tmp_path / "dino")
    tiny = {**protocols.CUSTOMCONCEPT101, "clip_model": f"local-dir:{oc}", "clip_pretrained": "openai",
            "clip_resize": 64, "clip_crop": 64, "dino": str(dino), "dino_resize": 72, "dino_crop": 64}
    monkeypatch.setitem(protocols.PROTOCOLS, "customconcept101", tiny)
    used = []
    real = protocols.CDTransform.__call__
    monkeypatch.setattr(protocols.CDTransform, "__call__", lambda self, im: used.append(self.mean) or real(self, im))
    concepts, imgs = _self_reference_set(tmp_path)
    res = evaluate.main(["--images", str(imgs), "--concepts", str(concepts), "--detector", "none", "--protocol",
                         "customconcept101", "--output_dir", str(tmp_path / "e")])["imgs"]
    s = res["summary"]
    assert s["image_alignment"] == pytest.approx(1.0, abs=1e-6) and s["dino_alignment"] == pytest.approx(1.0, abs=1e-6)
    assert res["settings"]["protocol"]["name"] == "customconcept101"
    assert res["settings"]["clip_model"] == f"local-dir:{oc}" and res["settings"]["dino"] == str(dino)
    # both towers read their images through Custom Diffusion's transforms
    assert protocols.CLIP_MEAN in used and protocols.IMAGENET_MEAN in used
    # the text is the prompt with the token replaced by the class word, nothing prefixed; 2.5 x max(cos, 0)
    from clif.eval.backbones import Backbone

    b = Backbone(f"local-dir:{oc}", None, "cpu")
    b.preprocess = protocols.clip_transform(tiny)
    score, cos = metrics.clip_score(b.images([Image.open(imgs / "a.png").convert("RGB")], 1),
                                    b.texts(["a photo of toy"], 1))
    assert s["text_cosine"] == pytest.approx(float(cos[0]), abs=1e-6)
    assert s["text_alignment"] == pytest.approx(float(score[0]), abs=1e-6)
    prefixed = metrics.clip_score(b.images([Image.open(imgs / "a.png").convert("RGB")], 1),
                                  b.texts(["A photo depicts a photo of toy"], 1))[1]
    assert abs(float(prefixed[0]) - s["text_cosine"]) > 1e-4


def test_evaluate_protocol_conflict_is_one_line(tmp_path, capsys):
    concepts, imgs = _self_reference_set(tmp_path)
    out = tmp_path / "out"
    argv = ["--images", str(imgs), "--concepts", str(concepts), "--detector", "none", "--output_dir", str(out),
            "--protocol", "customconcept101"]
    for extra, needle in [(["--clip_model", "ViT-L-14"], "fixes --clip_model"), (["--dino", "x"], "fixes --dino"),
                          (["--protocol", "nope"], "--protocol")]:
        code, err = run_cli(evaluate.main, [*argv, *extra], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
