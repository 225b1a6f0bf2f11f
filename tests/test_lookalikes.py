"""The DreamBench look-alike pairs (clif/eval/lookalikes.py, dataset/lookalikes_dreambench.json): the shipped set, its
prompts, bad sets, and evaluate.py --pairs on dreambench-mini (dog/dog2, cat/cat2)."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, needs_data, run_cli
from PIL import Image

import evaluate
from clif.eval import lookalikes
from clif.errors import UserError
from clif.concepts import load_concept_set
from clif.generate import expand_prompt_set

DB = SHARED_DATA / "dreambench-mini"

# google/dreambooth dataset/prompts_and_classes.txt: every subject and its class
DREAMBENCH = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock", "colorful_sneaker": "sneaker",
    "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog",
    "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon", "robot_toy": "toy",
    "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase", "wolf_plushie": "stuffed animal",
}


def test_shipped_set_is_dreambench_pairs():
    s = lookalikes.load_pairs("dreambench")
    for name, sub in s.subjects.items():
        assert DREAMBENCH[name] == sub.class_word, name  # DreamBench's own class
        assert len(sub.initializer.split()) == 1
    keys = {p.key for p in s.pairs}
    # MuDI's category-set pairs whose subjects are both DreamBench's
    assert {("dog2", "dog6"), ("monster_toy", "robot_toy"), ("can", "monster_toy")} <= keys
    assert {("dog", "dog2"), ("cat", "cat2")} <= keys  # the pairs dreambench-mini can test
    assert all(p.basis for p in s.pairs) and len(keys) == len(s.pairs) >= 10


def test_lookalike_prompts_fill_both_slots():
    s = lookalikes.load_pairs("dreambench")
    lines = [ln for ln in s.prompts.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) >= 8 and all("{0}" in ln and "{1}" in ln for ln in lines)
    prompts = expand_prompt_set("lookalike", [{"token": "<dog>"}, {"token": "<dog2>"}])
    assert len(prompts) == len(lines) and all("<dog>" in p and "<dog2>" in p for p in prompts)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["pairs"].append({"a": "dog", "b": "nope"}), "'nope' is not in 'subjects'"),
    (lambda d: d["pairs"].append({"a": "dog", "b": "dog"}), "two different subjects"),
    (lambda d: d["pairs"].append({"a": "dog2", "b": "dog"}), "listed twice"),
    (lambda d: d["subjects"]["dog"].update(initializer="big dog"), "single word"),
    (lambda d: d.pop("pairs"), "'pairs'"),
])
def test_bad_sets_are_named(tmp_path, edit, needle):
    data = json.loads(lookalikes.BUILTIN["dreambench"].read_text())
    edit(data)
    f = tmp_path / "set.json"
    f.write_text(json.dumps(data))
    with pytest.raises(UserError, match=needle):
        lookalikes.load_pairs(str(f))
    with pytest.raises(UserError, match="no such file"):
        lookalikes.load_pairs(str(tmp_path / "absent.json"))


def test_cli_list(capsys):
    lookalikes.main(["list"])
    out = capsys.readouterr().out
    assert "dog6 (dog) / dog2 (dog): MuDI category set" in out
    assert len(out.strip().splitlines()) == len(lookalikes.load_pairs("dreambench").pairs)


@needs_data("dreambench-mini")
def test_concepts_for_a_pair_read_dreambench(tmp_path):
    lookalikes.main(["concepts", "--dreambench", str(DB), "--pair", "dog", "dog2", "--out", str(tmp_path / "d")])
    concepts = load_concept_set(tmp_path / "d")
    got = [(c.token, c.class_word, c.initializer) for c in concepts]
    assert got == [("<dog>", "dog", "dog"), ("<dog2>", "dog", "dog")]
    assert [p.name for p in concepts[0].images] == sorted(p.name for p in (DB / "dog").glob("*.jpg"))
    assert not list((tmp_path / "d").rglob("*.jpg"))  # referenced, not copied
    with pytest.raises(UserError, match="not a folder"):
        lookalikes.write_concepts(lookalikes.load_pairs("dreambench"), ["dog6"], DB, tmp_path / "x")


@needs_data("dreambench-mini")
def test_evaluate_pairs_on_dreambench_mini(tmp_path, capsys):
    from clif.fixtures.tiny import build_openclip

    oc = build_openclip(tmp_path / "oc")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    prompts = {}
    for i, (a, b) in enumerate([("dog", "dog2"), ("cat", "cat2"), ("cat2", "cat")]):
        im = Image.new("RGB", (128, 64))
        im.paste(Image.open(DB / a / "00.jpg").convert("RGB").resize((64, 64)), (0, 0))
        im.paste(Image.open(DB / b / "00.jpg").convert("RGB").resize((64, 64)), (64, 0))
        im.save(imgs / f"{i}.png")
        prompts[f"{i}.png"] = f"a photo of <{a}> on the left and <{b}> on the right"
    (imgs / "prompts.json").write_text(json.dumps(prompts))
    argv = ["--images", str(imgs), "--pairs", "dreambench", "--dreambench", str(DB), "--clip_model",
            f"local-dir:{oc}", "--detector", "none", "--output_dir", str(tmp_path / "e")]
    res = evaluate.main(argv)["imgs"]
    by_pair = {tuple(p["pair"]): p for p in res["per_pair"]}
    assert by_pair[("cat", "cat2")]["images"] == 2 and by_pair[("dog", "dog2")]["images"] == 1
    assert by_pair[("cat", "cat2")]["lookalike"] and by_pair[("cat", "cat2")]["basis"].startswith("same DreamBench")
    assert by_pair[("dog2", "dog6")]["images"] == 0  # a pair of the set without images is listed
    assert len(by_pair) == len(lookalikes.load_pairs("dreambench").pairs)
    assert set(res["summary"]["image_alignment_per_concept"]) == {"dog", "dog2", "cat", "cat2"}
    for extra, needle in [(["--concepts", str(DB)], "not both"), (["--pairs", "nope.json"], "no such file")]:
        code, err = run_cli(evaluate.main, [*argv, *extra, "--output_dir", str(tmp_path / "o")], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    code, err = run_cli(evaluate.main, [a for a in argv if a not in ("--pairs", "dreambench")] +
                        ["--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--dreambench needs --pairs" in err
    assert not (tmp_path / "o").exists()
