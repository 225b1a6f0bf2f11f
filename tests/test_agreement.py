"""Metric vs ground truth (clif/eval/agreement.py): kappa, Spearman, the continuous CLIP confusion score, halves D&C,
the join with oracle.json / metrics.json, and compare_folder on a tiny world-like CLIP folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, needs_data, side_by_side
from PIL import Image

import evaluate
from clif.eval import agreement
from clif.concepts import load_concept_set
from clif.eval.metrics import confusion_decision

DB = SHARED_DATA / "dreambench-mini"


def test_agreement_rate_and_kappa_known_answers():
    a, b = [1, 1, 0, 0], [1, 0, 0, 0]
    assert agreement.agreement_rate(a, b) == 0.75
    assert agreement.cohen_kappa(a, b) == pytest.approx(0.5)  # p_o 0.75, p_e 0.5*0.25 + 0.5*0.75 = 0.5
    assert agreement.cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert agreement.cohen_kappa([1, 1], [1, 1]) is None  # chance agreement 1: undefined


def test_spearman_known_answers_with_ties():
    assert agreement.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2 / (4*15)
    assert agreement.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # a 0/1 oracle: average ranks 1.5, 1.5, 3.5, 3.5 against 1..4 -> 4 / sqrt(4 * 5)
    assert agreement.spearman([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(2 / 5**0.5)
    assert agreement.spearman([1, 1, 1], [1, 2, 3]) is None
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, 40).astype(float), rng.normal(size=40)
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return
    assert agreement.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_clip_confusion_score_matches_the_decision():
    assert agreement.clip_confusion_score([[0.9, 0.1], [0.2, 0.8]]) == pytest.approx(-0.6)  # margins 0.8, 0.6
    assert agreement.clip_confusion_score([[0.2, 0.8], [0.9, 0.1]]) == pytest.approx(-0.6)  # crossed assignment
    assert agreement.clip_confusion_score([[0.9, 0.1], [0.8, 0.2]]) == pytest.approx(0.6)  # both the first concept
    rng = np.random.default_rng(1)
    for _ in range(300):
        sims, margin = rng.uniform(-1, 1, (2, 2)), float(rng.uniform(0, 0.3))
        confused = confusion_decision(torch.tensor(sims), margin)[1]
        assert confused == (agreement.clip_confusion_score(sims) > -margin), (sims, margin)


def _colour(images):
    return torch.stack([torch.tensor(np.asarray(im.convert("RGB"), dtype=float).mean(axis=(0, 1))) for im in images])


def test_halves_dc_clean_beats_mixed():
    red, blue = (230, 20, 20), (20, 20, 230)
    refs = [_colour([Image.new("RGB", (8, 8), red)] * 2), _colour([Image.new("RGB", (8, 8), blue)] * 2)]

    def img(left, right):
        im = Image.new("RGB", (32, 16), left)
        im.paste(Image.new("RGB", (16, 16), right), (16, 0))
        return im

    clean = agreement.halves_dc(img(red, blue), refs, _colour)
    assert clean["boxes"] == 2 and clean["dc"] == pytest.approx(1.0, abs=1e-9)
    assert agreement.halves_dc(img(blue, red), refs, _colour)["dc"] == pytest.approx(1.0, abs=1e-9)
    assert agreement.halves_dc(img(red, red), refs, _colour)["dc"] < 0.8
    assert agreement.halves_dc(img((125, 20, 125), (125, 20, 125)), refs, _colour)["dc"] < 0.9


def test_agreement_table_and_join():
    oracle = [{"image": f"{i}.png", "confused": c} for i, c in enumerate([True, True, False, False, False])]
    ev = [
        {"file": "0.png", "found": True, "confused": True, "confusion_sims": [[0.9, 0.1], [0.8, 0.2]]},
        {"file": "1.png", "found": True, "confused": False, "confusion_sims": [[0.9, 0.1], [0.2, 0.8]]},
        {"file": "2.png", "found": True, "confused": False, "confusion_sims": [[0.9, 0.1], [0.1, 0.95]]},
        {"file": "3.png", "found": False, "confused": False, "confusion_sims": None},
        {"file": "extra.png", "found": True, "confused": True, "confusion_sims": [[0.5, 0.5], [0.5, 0.5]]},
    ]
    rows = agreement.join_rows(oracle, ev, {"0.png": 0.1, "1.png": 0.3, "2.png": 0.9, "3.png": 0.8})
    assert [r["image"] for r in rows] == ["0.png", "1.png", "2.png", "3.png"]  # 4.png has no eval row
    assert [r["clip"] for r in rows] == [True, False, False, None]
    t = agreement.agreement(rows, dc_cut=0.5)
    assert t["images"] == 4 and t["oracle_confusion"] == 0.5
    c = t["clip_confusion"]
    assert c["images"] == 3 and c["agreement"] == pytest.approx(2 / 3) and c["scored_images"] == 3
    # decisions: D&C < 0.5 -> confused for 0.png and 1.png, exactly the oracle's
    d = t["dc"]
    assert d["images"] == 4 and d["agreement"] == 1.0 and d["kappa"] == pytest.approx(1.0) and d["cut"] == 0.5
    assert d["spearman"] == pytest.approx(agreement.spearman([1, 1, 0, 0], [0.9, 0.7, 0.1, 0.2]))


def test_compare_folder_on_a_transformers_clip(tiny_sd15, concept_set, tmp_path):
    """The toy-world call on stand-ins: evaluate.py's metrics.json, an oracle.json, the world's CLIP as features."""
    concepts = load_concept_set(concept_set)
    a, b = concepts[0], concepts[1]
    folder = tmp_path / "imgs"
    folder.mkdir()
    prompts, oracle = {}, []
    for i, (x, y) in enumerate([(a, b), (a, a)]):
        side_by_side(x.images[0], y.images[1]).save(folder / f"{i}.png")
        prompts[f"{i}.png"] = f"a photo of {a.token} on the left and {b.token} on the right"
        oracle.append({"image": f"{i}.png", "confused": x is y})
    (folder / "prompts.json").write_text(json.dumps(prompts))
    (folder / "oracle.json").write_text(json.dumps({"rows": oracle}))
    clip = tiny_sd15 / "paired_clip"
    evaluate.main(["--images", str(folder), "--concepts", str(concept_set), "--clip_model", str(clip),
                   "--detector", "none", "--output_dir", str(tmp_path / "e")])
    report = agreement.main(["--images", str(folder), "--oracle", str(folder / "oracle.json"), "--metrics",
                             str(tmp_path / "e" / "metrics.json"), "--concepts", str(concept_set), "--clip_model",
                             str(clip), "--out", str(tmp_path / "agreement.json")])
    assert report["images"] == 2 and report["oracle_confusion"] == 0.5
    assert report["clip_confusion"]["images"] == 2 and report["dc"]["images"] == 2
    assert json.loads((tmp_path / "agreement.json").read_text()) == report


@needs_data("dreambench-mini")
def test_halves_dc_on_real_photos():
    def hist(images):
        out = []
        for im in images:
            q = np.asarray(im.convert("RGB").resize((64, 64))) // 64
            out.append(torch.tensor(np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64),
                                    dtype=torch.float64))
        return torch.stack(out)

    refs = [hist([Image.open(p) for p in sorted((DB / n).glob("*.jpg"))]) for n in ("cat", "cat2")]

    def side_by_side(x, y):
        im = Image.new("RGB", (256, 128))
        im.paste(Image.open(x).convert("RGB").resize((128, 128)), (0, 0))
        im.paste(Image.open(y).convert("RGB").resize((128, 128)), (128, 0))
        return im

    clean = agreement.halves_dc(side_by_side(DB / "cat" / "01.jpg", DB / "cat2" / "01.jpg"), refs, hist)["dc"]
    twice = agreement.halves_dc(side_by_side(DB / "cat2" / "01.jpg", DB / "cat2" / "02.jpg"), refs, hist)["dc"]
    assert clean > twice
