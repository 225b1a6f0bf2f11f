"""Detect-and-Compare (clif/eval/dc.py): the matrices, greedy ordering, spectral norm and box count with known answers;
crops, detection scaling, the DINOv2 feature; evaluate.py's D&C path with tiny models and its flag checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, colour_histogram, needs_data, run_cli, side_by_side
from PIL import Image

import evaluate
from clif.eval import dc
from clif.concepts import load_concept_set

DB = SHARED_DATA / "dreambench-mini"

RED, BLUE, PURPLE = (230, 20, 20), (20, 20, 230), (125, 20, 125)


def _colour_embed(images):
    """A controlled feature: the mean RGB of each image (what separates the test's red and blue subjects)."""
    return torch.stack([torch.tensor(np.asarray(im.convert("RGB"), dtype=float).mean(axis=(0, 1))) for im in images])


def _solid(colour, size=(16, 16)):
    return Image.new("RGB", size, colour)


def _refs():
    """Subject 0: reddish references, subject 1: bluish ones."""
    reds = [_solid(RED), _solid((200, 40, 30))]
    blues = [_solid(BLUE), _solid((30, 40, 200))]
    return [_colour_embed(reds), _colour_embed(blues)]


def test_identical_matrices_give_one():
    refs = _refs()
    s_gt = dc.gt_matrix(refs)
    assert dc.dc_score(s_gt.clone(), s_gt) == pytest.approx(1.0, abs=1e-12)


def test_gt_matrix_includes_self_pairs():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    s = dc.gt_matrix([torch.tensor([e1, e2]), torch.tensor([e1])])
    # subject 0's own references are orthogonal: mean of [[1, 0], [0, 1]] = 0.5 (0 without the self-pairs)
    torch.testing.assert_close(s, torch.tensor([[0.5, 0.5], [0.5, 1.0]], dtype=torch.float64))


def test_dc_matrix_is_mean_cosine_per_subject():
    crops = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    refs = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 5.0]])]
    torch.testing.assert_close(dc.dc_matrix(crops, refs), torch.tensor([[0.5, 0.0], [0.5, 1.0]], dtype=torch.float64))


def test_spectral_norm_not_frobenius():
    s_gt = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=torch.float64)
    s_dc = torch.tensor([[0.7, 0.2], [0.2, 0.6]], dtype=torch.float64)  # S_DC - S_GT = diag(-0.3, -0.4)
    # spectral norm 0.4 -> 0.6; Frobenius 0.5 would give 0.5, the nuclear norm 0.7 would give 0.3
    assert dc.dc_score(s_dc, s_gt) == pytest.approx(0.6, abs=1e-12)


def test_rows_ordered_greedily_by_column_maximum():
    s = torch.tensor([[0.9, 0.8], [0.95, 0.1]])
    torch.testing.assert_close(dc.order_rows(s), torch.tensor([[0.95, 0.1], [0.9, 0.8]]))
    # greedy, not the best assignment: column 0 takes row 0 (0.9) although row 1 -> column 0 sums higher
    s = torch.tensor([[0.9, 0.85], [0.8, 0.1]])
    torch.testing.assert_close(dc.order_rows(s), s)
    # ties: the first row (MuDI's strict '>')
    tie = torch.tensor([[0.5, 0.1], [0.5, 0.9]])
    torch.testing.assert_close(dc.order_rows(tie), tie)
    # the box order does not matter: the rows are reordered before comparing
    s_gt = dc.gt_matrix(_refs())
    s_dc = torch.tensor([[0.2, 0.9], [0.95, 0.3]])
    assert dc.dc_score(s_dc, s_gt) == pytest.approx(dc.dc_score(s_dc[[1, 0]], s_gt), abs=1e-12)
    assert dc.dc_score(s_dc, s_gt) > 0.5


def test_wrong_box_count_scores_zero():
    refs = _refs()

    def no_embed(_):
        raise AssertionError("a wrong count is not embedded")

    for crops in ([_solid(RED)], [_solid(RED), _solid(BLUE), _solid(BLUE)], []):
        res = dc.dc_of_crops(crops, refs, no_embed)
        assert res["dc"] == 0.0 and res["boxes"] == len(crops) and res["matrix"] is None
    assert dc.dc_of_crops([_solid(RED), _solid(BLUE)], refs, _colour_embed)["dc"] > 0.9
    # the score itself: three boxes whose best two match perfectly still score 0
    s_gt = dc.gt_matrix(refs)
    assert dc.dc_score(torch.cat([s_gt, s_gt[:1]]), s_gt) == 0.0 and dc.dc_score(s_gt[:1], s_gt) == 0.0


def test_swapped_or_mixed_identity_scores_lower_than_clean():
    refs = _refs()
    clean = dc.dc_of_crops([_solid(RED), _solid(BLUE)], refs, _colour_embed)["dc"]
    reversed_boxes = dc.dc_of_crops([_solid(BLUE), _solid(RED)], refs, _colour_embed)["dc"]
    twice = dc.dc_of_crops([_solid(RED), _solid(RED)], refs, _colour_embed)["dc"]  # subject 1 replaced by 0
    mixed = dc.dc_of_crops([_solid(PURPLE), _solid(PURPLE)], refs, _colour_embed)["dc"]  # both a blend
    assert clean == pytest.approx(reversed_boxes, abs=1e-12)
    assert clean > 0.9 and twice < clean - 0.3 and mixed < clean - 0.1


def test_pad_to_white_square():
    im = Image.new("RGB", (20, 20), RED)
    out = dc.pad_to_white_square(im, (2, 5, 12, 9))  # a 10 x 4 crop
    a = np.asarray(out)
    assert out.size == (10, 10)
    assert (a[:3] == 255).all() and (a[7:] == 255).all()  # (10 - 4) // 2 = 3 white rows above, 3 below
    assert (a[3:7] == RED).all()
    tall = dc.pad_to_white_square(im, (0, 0, 4, 10))
    assert tall.size == (10, 10) and (np.asarray(tall)[:, :3] == 255).all() and (np.asarray(tall)[:, 3:7] == RED).all()


class _FakeDetector:
    """Stands in for clif.eval.backbones.Detector: records what it is asked, returns fixed boxes (OWLv2 coordinates)."""

    def __init__(self, boxes):
        self.device, self.seen, self.boxes = "cpu", {}, torch.tensor(boxes, dtype=torch.float32)
        outer = self

        class Inputs(dict):
            def to(self, _):
                return self

        class ImageProcessor:
            def post_process_object_detection(self, out, threshold, target_sizes):
                outer.seen.update(threshold=threshold, target_sizes=target_sizes.tolist())
                return [{"boxes": outer.boxes, "scores": torch.ones(len(outer.boxes))}]

        class Processor:
            image_processor = ImageProcessor()

            def __call__(self, text, images, return_tensors):
                outer.seen["text"] = text
                return Inputs()

        self.processor = Processor()
        self.model = lambda **_: None


def test_detect_boxes_queries_scaling_and_clamping():
    det = _FakeDetector([[10, 10, 150, 90], [5, 120, 50, 190], [190, 50, 260, 99]])
    boxes = dc.detect_boxes(det, Image.new("RGB", (200, 100)), ["dog", "toy"], 0.4)
    assert det.seen["text"] == [["dog", "toy"]]  # the class words as they are, no "a photo of" prefix
    assert det.seen["target_sizes"] == [[200, 200]] and det.seen["threshold"] == 0.4  # OWLv2's padded square
    # the second box lies in the padding below the image: dropped; the third is clamped to the right edge
    assert boxes == [(10.0, 10.0, 150.0, 90.0), (190.0, 50.0, 200.0, 99.0)]


def test_score_image_pads_crops_and_counts(monkeypatch):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(Image.new("RGB", (20, 20), BLUE), (20, 0))
    det = _FakeDetector([[0, 0, 20, 20], [20, 0, 40, 20]])
    refs = dict(zip(["r", "b"], _refs()))
    res = dc.score_image(im, ["r", "b"], ["toy", "toy"], refs, _colour_embed, det, 0.4)
    assert res["boxes"] == 2 and res["dc"] > 0.9 and res["box_list"] == [[0, 0, 20, 20], [20, 0, 40, 20]]
    det1 = _FakeDetector([[0, 0, 20, 20]])
    assert dc.score_image(im, ["r", "b"], ["toy", "toy"], refs, _colour_embed, det1, 0.4)["dc"] == 0.0


def test_tiny_dinov2_is_mean_of_last_hidden_state(tmp_path):
    from transformers import AutoImageProcessor, Dinov2Model

    from clif.fixtures.tiny import build_dinov2

    path = build_dinov2(tmp_path / "dv2")
    feats = dc.Dinov2Features(str(path), "cpu")
    ims = [Image.new("RGB", (90, 60), RED), Image.new("RGB", (50, 80), BLUE)]
    got = feats(ims, batch_size=1)
    model, proc = Dinov2Model.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path)
    with torch.no_grad():
        hidden = model(**proc(images=ims, return_tensors="pt")).last_hidden_state
    assert isinstance(feats.model, Dinov2Model) and got.shape == (2, 32)
    torch.testing.assert_close(got, hidden.mean(dim=1).double())  # all tokens, CLS included
    assert not torch.allclose(got, hidden[:, 0].double())
    from clif.fixtures.tiny import build  # `python -m clif.fixtures.tiny --family dinov2`: the same seeded weights

    again = Dinov2Model.from_pretrained(build("dinov2", tmp_path / "again")).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


# ---- evaluate.py


@pytest.fixture(scope="module")
def tiny_eval_models(tmp_path_factory):
    from clif.fixtures.tiny import build_dinov2, build_openclip, build_owlv2

    root = tmp_path_factory.mktemp("dcmodels")
    return {"oc": build_openclip(root / "oc"), "owl": build_owlv2(root / "owl"), "dv2": build_dinov2(root / "dv2")}


def _pair_images(concept_set, folder):
    """Two-concept images: the first reference of each concept side by side, left/right prompts."""
    concepts = load_concept_set(concept_set)
    a, b = concepts[0], concepts[1]
    folder.mkdir()
    prompts = {}
    for i, (x, y) in enumerate([(a, b), (b, a)]):
        im = side_by_side(x.images[0], y.images[0])
        im.save(folder / f"{i}.png")
        prompts[f"{i}.png"] = f"a photo of {x.token} on the left and {y.token} on the right"
    im.save(folder / "single.png")
    prompts["single.png"] = f"a photo of {a.token}"
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder


def _argv(m, imgs, concept_set, out, *extra):
    return ["--images", str(imgs), "--concepts", str(concept_set), "--clip_model", f"local-dir:{m['oc']}",
            "--detector", str(m["owl"]), "--dc_model", str(m["dv2"]), "--output_dir", str(out), *extra]


def test_evaluate_dc_on_by_default_with_a_detector(tiny_eval_models, concept_set, tmp_path):
    imgs = _pair_images(concept_set, tmp_path / "imgs")
    # threshold 0: the tiny random detector returns far more than two boxes -> every pair image scores 0
    res = evaluate.main(_argv(tiny_eval_models, imgs, concept_set, tmp_path / "e", "--dc_threshold", "0"))["imgs"]
    pair_rows = [r for r in res["rows"] if len(r["concepts"]) == 2]
    assert len(pair_rows) == 2 and all(r["dc"] == 0.0 and r["dc_boxes"] > 2 for r in pair_rows)
    assert all("dc" not in r for r in res["rows"] if len(r["concepts"]) == 1)
    s = res["summary"]
    assert s["dc"] == 0.0 and s["dc_zero_share"] == 1.0 and s["dc_images"] == 2
    by_prompt = {p["prompt"]: p for p in res["per_prompt"]}
    assert all(by_prompt[r["prompt"]]["dc_zero_share"] == 1.0 for r in pair_rows)
    assert [p for p in res["per_prompt"] if "dc" in p] == [by_prompt[r["prompt"]] for r in pair_rows]
    (pair,) = res["per_pair"]
    assert pair["images"] == 2 and pair["dc"] == 0.0 and pair["dc_zero_share"] == 1.0 and "confusion_rate" in pair
    assert res["settings"]["dc"] == {"model": str(tiny_eval_models["dv2"]), "threshold": 0.0}
    assert "| dc | dc_zero_share |" in (tmp_path / "e" / "metrics.md").read_text()
    assert Image.open(tmp_path / "e" / "pairs.png").width > 300


def test_evaluate_dc_with_boxes_found(tiny_eval_models, concept_set, tmp_path, monkeypatch):
    """Two boxes (the halves, via a stubbed detector call): a 2x2 matrix and a score; --metrics drops confusion."""
    imgs = _pair_images(concept_set, tmp_path / "imgs")
    seen = []

    def halves(detector, image, queries, threshold):
        seen.append((list(queries), threshold))
        w, h = image.size
        return [(0.0, 0.0, w / 2, float(h)), (w / 2, 0.0, float(w), float(h))]

    monkeypatch.setattr(dc, "detect_boxes", halves)
    res = evaluate.main(_argv(tiny_eval_models, imgs, concept_set, tmp_path / "e", "--metrics", "dc"))["imgs"]
    classes = {c.name: c.class_word for c in load_concept_set(concept_set)}
    pair_rows = [r for r in res["rows"] if len(r["concepts"]) == 2]
    assert [q for q, _ in seen] == [[classes[n] for n in r["concepts"]] for r in pair_rows]
    assert all(t == 0.4 for _, t in seen)  # MuDI's demo threshold is the default
    for r in pair_rows:
        assert r["dc_boxes"] == 2 and len(r["dc_matrix"]) == 2 and r["dc"] != 0.0 and r["dc"] <= 1.0
        assert "confused" not in r and "found" not in r
    assert res["summary"]["dc_zero_share"] == 0.0 and "confusion_rate" not in res["summary"]
    assert res["settings"]["metrics"] == ["clip", "dc"]


def test_evaluate_dc_flag_errors(tiny_eval_models, concept_set, tmp_path, capsys):
    imgs = _pair_images(concept_set, tmp_path / "imgs")
    out = tmp_path / "out"
    m = tiny_eval_models
    base = _argv(m, imgs, concept_set, out)
    cases = [
        ([*base[:6], "--detector", "none", *base[8:], "--metrics", "dc"], "--metrics dc needs a detector"),
        ([*base, "--dc_threshold", "1.5"], "--dc_threshold"),
        ([*base, "--metrics", "nope"], "--metrics"),
        ([*base, "--dc_model", str(tmp_path / "nothing")], f"--dc_model {tmp_path / 'nothing'} does not exist"),
    ]
    try:
        import dreamsim  # noqa: F401
    except ImportError:
        cases.append(([*base, "--dc_model", "dreamsim"], "dreamsim"))
    for argv, needle in cases:
        code, err = run_cli(evaluate.main, argv, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


@needs_data("dreambench-mini")
def test_dc_on_real_photos_clean_beats_duplicate(tmp_path):
    """Real DreamBench photos, halves as boxes, a colour-histogram feature: dog | dog2 beats dog2 | dog2."""

    hist = colour_histogram
    refs = [hist([Image.open(p) for p in sorted((DB / n).glob("*.jpg"))]) for n in ("dog", "dog2")]

    def pair(a, b):
        return [Image.open(a).convert("RGB").resize((128, 128)), Image.open(b).convert("RGB").resize((128, 128))]

    clean = dc.dc_of_crops(pair(DB / "dog" / "01.jpg", DB / "dog2" / "01.jpg"), refs, hist)["dc"]
    twice = dc.dc_of_crops(pair(DB / "dog2" / "01.jpg", DB / "dog2" / "02.jpg"), refs, hist)["dc"]
    assert clean > twice
