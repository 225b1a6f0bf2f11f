"""evaluate.py's confusion kinds (clif/eval/kinds.py) on images whose answer is known by construction.

Features are colour histograms (conftest.colour_histogram): a pure colour is one bin, so every cosine below is
exact -- red vs blue 0, a square half red and half blue 1/sqrt(2) to each. The references of <a> are red squares,
of <b> blue ones (leave-one-out gap exactly 1); the classes' common images are green and yellow squares.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import colour_histogram
from PIL import Image

import evaluate
from clif.concepts import Concept
from clif.eval import kinds
from clif.eval.agreement import folder_rows
from clif.eval.evaluation import Item, score_folder, summarize

RED, BLUE, GREEN, YELLOW, ORANGE, CYAN = (230, 20, 20), (20, 20, 230), (20, 230, 20), (230, 230, 20), (230, 140, 20), (
    20, 230, 230)
LR = "a photo of a <a> on the left and a <b> on the right"
SETTINGS = kinds.Settings(margin=0.2, common_margin=0.3, mixture_margin=0.1)


def square(colour, size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def split(left, right, size: int = 64) -> Image.Image:
    """One object that is half one colour, half the other: a mixture of two concepts by construction."""
    im = square(left, size)
    im.paste(square(right, size).crop((size // 2, 0, size, size)), (size // 2, 0))
    return im


def two_up(left: Image.Image, right: Image.Image) -> Image.Image:
    """A 128 x 64 image: its halves are squares, so the padding changes nothing and every cosine stays exact (64 px:
    the histogram's own resize is the identity)."""
    im = Image.new("RGB", (128, 64))
    im.paste(left, (0, 0))
    im.paste(right, (64, 0))
    return im


class Histograms:
    """A stand-in backbone: colour histograms for images, a constant for texts (alignment is not tested here)."""

    def images(self, images, batch_size):
        return colour_histogram(images)

    def texts(self, texts, batch_size):
        return torch.ones(len(texts), 64, dtype=torch.float64)


def concepts(class_a: str = "thing", class_b: str = "thing") -> list[Concept]:
    return [Concept("a", "<a>", class_a, class_a, []), Concept("b", "<b>", class_b, class_b, [])]


def score(tmp_path, images: dict[str, Image.Image], prompt: str = LR, cs=None, common="default", **kw) -> dict:
    """score_folder over `images` (name -> image) with red / blue references; rows by name."""
    cs = cs or concepts()
    refs = {"a": colour_histogram([square(RED)] * 3), "b": colour_histogram([square(BLUE)] * 3)}
    if common == "default":
        common = {"thing": colour_histogram([square(GREEN), square(YELLOW)])}
    items = []
    for name, im in images.items():
        im.save(tmp_path / f"{name}.png")
        items.append(Item(tmp_path / f"{name}.png", prompt))
    kw.setdefault("kind_settings", SETTINGS)
    kw.setdefault("class_texts", {})  # no class words unless a test gives them (the stand-in has no text tower)
    rows = score_folder(items, cs, refs, Histograms(), batch_size=4, margin=0.02, common_refs=common, **kw)
    return {r["file"][:-4]: r for r in rows}


def test_loo_gap_known_answers():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    assert kinds.loo_gap(torch.stack([e1, e1]), torch.stack([e2])) == pytest.approx(1.0)  # own 1, other 0
    # own: each reference sees only the other one (cos 0); other: e1 -> 1, e2 -> 0; gap 0 - 0.5
    assert kinds.loo_gap(torch.stack([e1, e2]), torch.stack([e1])) == pytest.approx(-0.5)
    assert kinds.loo_gap(torch.stack([e1]), torch.stack([e2])) == pytest.approx(1.0)  # one reference: own sim 1
    assert kinds.calibrate([torch.stack([e1, e1]), torch.stack([e2, e2])]) == [pytest.approx(1.0)] * 2


def test_image_kind_table():
    assert kinds.image_kind([0, 1], positional=True) == "correct"
    assert kinds.image_kind([1, 0], positional=True) == "swapped"
    assert kinds.image_kind([1, 0], positional=False) == "correct"  # no sides asked for: any one-to-one is right
    assert kinds.image_kind([0, 0], positional=True) == kinds.image_kind([1, 1], positional=False) == "same"
    assert kinds.image_kind([0, "mix"], positional=True) == kinds.image_kind(["other", "mix"], True) == "mixture"
    assert kinds.image_kind([0, "other"], positional=True) == "other"
    assert set(kinds.CONFUSED) == {"swapped", "same", "mixture"}


def test_known_pairs_correct_swapped_same_mixture_other(tmp_path):
    rows = score(tmp_path, {
        "correct": two_up(square(RED), square(BLUE)),
        "swapped": two_up(square(BLUE), square(RED)),
        "same": two_up(square(RED), square(RED)),
        "mixture": two_up(square(RED), split(RED, BLUE)),
        "other": two_up(square(RED), square(GREEN)),
    })
    want = {"correct": False, "swapped": True, "same": True, "mixture": True, "other": False}
    for name, confused in want.items():
        r = rows[name]
        assert r["kind"] == name and r["confused"] is confused, (name, r["kind"], r["kind_labels"])
    assert rows["mixture"]["kind_labels"] == ["a", "mix"] and rows["other"]["kind_labels"] == ["a", "other"]
    assert rows["mixture"]["kind_sims"][1] == pytest.approx([1 / math.sqrt(2)] * 2)
    assert rows["correct"]["kind_gap"] == [pytest.approx(1.0)] * 2
    # the fixed-margin rule, kept beside: blind to sides, and calls "like neither" confused
    assert rows["swapped"]["confused_margin"] is False and rows["other"]["confused_margin"] is True
    margin = score(tmp_path, {"swapped": two_up(square(BLUE), square(RED))}, decision="margin")["swapped"]
    assert margin["confused"] is False and margin["kind"] == "swapped"  # the flag picks what `confused` says
    s = summarize(list(rows.values()))
    assert s["confusion_rate"] == pytest.approx(3 / 5) and s["confusion_rate_margin"] == pytest.approx(3 / 5)
    assert {k: s[f"kind_{k}"] for k in kinds.KINDS} == {k: pytest.approx(0.2) for k in kinds.KINDS}


def test_sides_only_count_when_the_prompt_names_them(tmp_path):
    rows = score(tmp_path, {"x": two_up(square(BLUE), square(RED))}, prompt="a <a> and a <b> on a table")
    assert rows["x"]["found"] is False  # no sides asked for: no halves, no detector -> nothing found
    rows = score(tmp_path, {"x": two_up(square(BLUE), square(RED))})
    assert rows["x"]["kind"] == "swapped"
    d = kinds.decide([[0.0, 1.0], [1.0, 0.0]], None, [1.0, 1.0], False, True, SETTINGS)
    assert d["kind"] == "correct" and not d["confused"]


def test_class_leak_is_a_mixture_and_the_own_class_is_other(tmp_path):
    """<a> a red ball, <b> a blue box: a second *ball* that is not <a> beside <a> is <a>'s class leaking into <b>'s
    slot (mixture); a *box* that is not <b> is a fidelity failure (other)."""
    cs = concepts("ball", "box")
    common = {"ball": colour_histogram([square(ORANGE)] * 2), "box": colour_histogram([square(CYAN)] * 2)}
    rows = score(tmp_path, {"leak": two_up(square(RED), square(ORANGE)), "own": two_up(square(RED), square(CYAN))},
                 cs=cs, common=common)
    assert rows["leak"]["kind"] == "mixture" and rows["leak"]["confused"]
    assert rows["own"]["kind"] == "other" and not rows["own"]["confused"]
    # the same two images, both concepts of one class: no class to leak, both are "like neither"
    rows = score(tmp_path, {"leak": two_up(square(RED), square(ORANGE))}, cs=concepts("ball", "ball"),
                 common={"ball": common["ball"]})
    assert rows["leak"]["kind"] == "other"


def test_class_words_decide_the_class(tmp_path):
    """<a> a red ball, <b> a blue box; "a photo of a ball" / "... box" stand in as red-orange / cyan histograms. An
    object half blue, half orange is most like <b> by its references, but its class is ball: it cannot be the box
    <b>, and beside the ball <a> it is <a>'s class leaking (mixture). Without class words it passes as <b>."""
    cs = concepts("ball", "box")
    common = {"ball": colour_histogram([square(GREEN)]), "box": colour_histogram([square(YELLOW)])}
    texts = {"ball": colour_histogram([split(RED, ORANGE)])[0], "box": colour_histogram([square(CYAN)])[0]}
    im = {"x": two_up(square(RED), split(BLUE, ORANGE))}
    with_words = score(tmp_path, im, cs=cs, common=common, class_texts=texts)["x"]
    assert with_words["kind"] == "mixture" and with_words["kind_labels"] == ["a", "mix"]
    assert with_words["kind_class"] == [pytest.approx([1 / math.sqrt(2), 0.0]), pytest.approx([0.5, 0.0])]
    without = score(tmp_path, im, cs=cs, common=common)["x"]
    assert without["kind"] == "correct" and without["kind_class"] is None
    # a box that is not <b> beside <a>: its own class, so a fidelity failure, not a leak
    own = score(tmp_path, {"y": two_up(square(RED), square(CYAN))}, cs=cs, common=common, class_texts=texts)["y"]
    assert own["kind"] == "other"


def test_class_words_count_only_beyond_the_class_margin():
    """Instance 0 is <a> by its references; its class words lean to <b>'s class by 0.05. Read (class_margin 0), that
    rules <a> out; with class_margin 0.5 x the references' class gap 0.4 = 0.2, a 0.05 lean is not read."""
    s, classes = [[0.9, 0.1], [0.1, 0.9]], [[0.45, 0.5], [0.1, 0.9]]
    read = kinds.Settings(0.2, 0.3, 0.1, class_margin=0.0)
    unread = kinds.Settings(0.2, 0.3, 0.1, class_margin=0.5)
    assert kinds.decide(s, None, [1.0, 1.0], True, False, read, classes, [0.4, 0.4])["labels"] == ["mix", 1]
    assert kinds.decide(s, None, [1.0, 1.0], True, False, unread, classes, [0.4, 0.4])["labels"] == [0, 1]
    # one class for both concepts: the class words are never read
    assert kinds.decide(s, None, [1.0, 1.0], True, True, read, classes, [0.4, 0.4])["labels"] == [0, 1]
    e1, e2 = torch.eye(2, dtype=torch.float64)
    assert kinds.class_gap([torch.stack([e1, e1]), torch.stack([e2])], [e1, e2]) == [1.0, 1.0]


def test_like_one_concept_but_of_the_other_class_is_a_mixture():
    """Instance 0 looks like <a> (0.9 vs 0.1, nothing like the common images) but its class words say <b>'s class:
    one object with <a>'s look and <b>'s class is a mixture (class_mix); without that rule it is merely 'other'."""
    s, k = [[0.9, 0.1], [0.0, 0.0]], [[0.0, 0.0], [0.5, 0.5]]
    classes = [[0.2, 0.8], [0.5, 0.5]]  # instance 1: a tie, its class is not read
    on = kinds.Settings(0.2, 0.3, 0.3, class_margin=0.0, class_mix=True)
    off = kinds.Settings(0.2, 0.3, 0.3, class_margin=0.0, class_mix=False)
    assert kinds.decide(s, k, [1.0, 1.0], True, False, on, classes, [0.4, 0.4])["labels"] == ["mix", "other"]
    assert kinds.decide(s, k, [1.0, 1.0], True, False, off, classes, [0.4, 0.4])["labels"] == ["other", "other"]


def test_without_common_images_an_unclear_instance_is_a_mixture(tmp_path):
    rows = score(tmp_path, {"m": two_up(square(RED), split(RED, BLUE)), "c": two_up(square(RED), square(BLUE))},
                 common=None)
    assert rows["m"]["kind"] == "mixture" and rows["m"]["kind_common"] is None
    assert rows["c"]["kind"] == "correct"


def test_margin_is_in_units_of_the_gap():
    s = [[0.9, 0.7], [0.0, 1.0]]  # instance 0 prefers <a> by 0.2
    assert kinds.decide(s, None, [1.0, 1.0], True, True, SETTINGS)["labels"] == [0, 1]  # 0.2 >= 0.2 x 1
    assert kinds.decide(s, None, [1.5, 1.5], True, True, SETTINGS)["labels"] == ["mix", 1]  # 0.2 < 0.2 x 1.5
    # the common images: <a> by 0.2 over <b>, but only 0.1 over a common member: not <a> with common_margin 0.3
    assert kinds.decide(s, [[0.8, 0.8], [0.0, 0.0]], [1.0, 1.0], True, True, SETTINGS)["labels"] == ["other", 1]


def test_instances_are_padded_to_squares_not_zoomed(tmp_path):
    """A 64 x 16 image's halves (32 x 16) reach the feature model as 32 x 32 white squares: the scale of the
    image is kept (CLIP's centre crop would zoom a half and cut it); the margin rule still sees the raw halves."""
    seen = []

    def features(images):
        seen.extend(im.size for im in images)
        return colour_histogram(images)

    im = Image.new("RGB", (64, 16), RED)
    im.paste(square(BLUE, 16).resize((32, 16)), (32, 0))
    score(tmp_path, {"wide": im}, feature_fn=features, match_refs={
        "a": colour_histogram([square(RED)] * 3), "b": colour_histogram([square(BLUE)] * 3)})
    assert seen == [(32, 16), (32, 16), (32, 32), (32, 32)]


def test_decision_flag_and_fields_end_to_end(tiny_sd15, concept_set, tmp_path):
    """evaluate.py: kinds by default (settings and the classes with common images recorded), the margin rule with
    --confusion_decision margin; agreement's join carries both decisions and the kind."""
    data = tmp_path / "set"
    spec = json.loads((concept_set / "concepts.json").read_text())
    for c in spec["concepts"]:
        c["images"] = str((concept_set / c["images"]).resolve())
        c.pop("masks", None)
    data.mkdir()
    (data / "concepts.json").write_text(json.dumps(spec))
    cls = spec["concepts"][0]["class"]
    (data / "common" / cls).mkdir(parents=True)
    square(GREEN).save(data / "common" / cls / "0.png")
    a, b = (c["token"] for c in spec["concepts"][:2])
    folder = tmp_path / "imgs"
    folder.mkdir()
    two_up(square(RED), square(BLUE)).save(folder / "0.png")
    (folder / "prompts.json").write_text(json.dumps({"0.png": f"a photo of {a} on the left and {b} on the right"}))
    clip = str(tiny_sd15 / "paired_clip")
    base = ["--images", str(folder), "--concepts", str(data), "--clip_model", clip, "--detector", "none"]
    res = evaluate.main(base + ["--output_dir", str(tmp_path / "k")])["imgs"]
    row, conf = res["rows"][0], res["settings"]["confusion"]
    assert conf["decision"] == "kinds" and conf["kind_settings"] == kinds.SETTINGS.as_dict()
    assert conf["common_classes"] == [cls]
    assert row["kind"] in kinds.KINDS and row["confused"] == (row["kind"] in kinds.CONFUSED)
    assert "confused_margin" in row and "kind_mixture" in res["summary"]
    res = evaluate.main(base + ["--output_dir", str(tmp_path / "m"), "--confusion_decision", "margin"])["imgs"]
    assert res["rows"][0]["confused"] == res["rows"][0]["confused_margin"] == row["confused_margin"]
    (folder / "oracle.json").write_text(json.dumps({"rows": [{"image": "0.png", "confused": True, "kind": "same"}]}))
    joined = folder_rows(folder, folder / "oracle.json", tmp_path / "k" / "metrics.json", data, clip)[0]
    assert joined["oracle_kind"] == "same" and joined["kind"] == row["kind"]
    assert joined["clip"] == row["confused"] and joined["clip_margin"] == row["confused_margin"]


def test_metric_study_block_is_generated_from_the_committed_study(tmp_path, monkeypatch):
    """docs/evaluation.md's confusion-metric tables are exactly what `scripts/confusion_metric_study.py --from_json`
    (a thin wrapper of clif.toyworld.confusion_study) writes from the committed study JSON: no hand-typed numbers."""
    import importlib.util
    import shutil

    from conftest import REPO

    from clif.toyworld import confusion_study

    spec = importlib.util.spec_from_file_location("study", REPO / "scripts" / "confusion_metric_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main is confusion_study.main  # the old command runs the package's code
    copy = tmp_path / "evaluation.md"
    shutil.copy(REPO / "docs" / "evaluation.md", copy)
    before = copy.read_text()
    assert before.count(study.BEGIN) == 1 and before.count(study.END) == 1
    monkeypatch.chdir(REPO)  # the block names the JSON by its path in the repository
    study.main(["--json", "pretrained/toyworld/confusion_metric_study.json", "--from_json", "--readme", str(copy)])
    assert copy.read_text() == before
    from clif.toyworld.__main__ import main as toyworld

    (tmp_path / "docs").mkdir()
    (tmp_path / "pretrained" / "toyworld").mkdir(parents=True)
    shutil.copy(REPO / "docs" / "evaluation.md", tmp_path / "docs")
    shutil.copy(REPO / "pretrained" / "toyworld" / "confusion_metric_study.json", tmp_path / "pretrained" / "toyworld")
    (tmp_path / "docs" / "evaluation.md").write_text(before.replace("Cohen's kappa of each", "stale"))
    monkeypatch.chdir(tmp_path)  # the subcommand's default target: docs/evaluation.md
    toyworld(["confusion-study", "--json", "pretrained/toyworld/confusion_metric_study.json", "--from_json"])
    assert (tmp_path / "docs" / "evaluation.md").read_text() == before
