"""The toy-world demo (scripts/demo.sh): the concept-set command, the referee's reading, the summary read from the
demo's files, and the demo itself at reduced steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S, REPO
from PIL import Image

from clif.toyworld.__main__ import main as toyworld
from clif.toyworld.ladder import PAIR_PROMPTS, SINGLE_PROMPTS, load_rungs


def test_concepts_command_writes_a_set_the_stages_load(tmp_path):
    from clif.concepts import load_concept_set
    from clif.toyworld.concept_set import load_concepts

    out = tmp_path / "sets" / "distinct"
    toyworld(["concepts", "--rung", "distinct", "--out", str(out), "--images", "2", "--common", "1"])
    concepts = load_concept_set(out)
    assert [c.name for c in concepts] == ["ball_a", "box_b"]
    assert [len(c.images) for c in concepts] == [2, 2]
    assert all(len(list(c.masks_dir.glob("*.png"))) == 2 for c in concepts)
    assert {p.name for p in (out / "common").iterdir()} == {"ball", "box"}
    assert load_concepts(out) == dict(load_rungs()["distinct"])  # what the referee compares with
    assert (out / "prompts_single.txt").read_text().splitlines() == list(SINGLE_PROMPTS)
    assert (out / "prompts_pair.txt").read_text().splitlines() == list(PAIR_PROMPTS)
    assert sorted(p.name for p in out.parent.iterdir()) == ["distinct"]  # no leftover temporary folder

    own = tmp_path / "own"
    toyworld(["concepts", "--concept", "redball=red,ball", "--concept", "yband=yellow,ball,band,purple", "--out",
              str(own)])
    objs = load_concepts(own)
    assert (objs["redball"].color, objs["yband"].pattern, objs["yband"].pattern_color) == ("red", "band", "purple")
    assert len(list((own / "images" / "yband").glob("*.png"))) == 5  # the default count


def test_common_images_are_not_generated_for_words_the_set_brings(tmp_path, monkeypatch):
    """The toy-world set brings its own other balls and boxes: stage 1 loads no pipeline to draw more."""
    import diffusers
    import torch

    from clif.contrastive.common_concepts import generate_common_images

    class Loaded(Exception):
        pass

    def load(*a, **k):
        raise Loaded

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", load)
    data = tmp_path / "set"
    toyworld(["concepts", "--rung", "distinct", "--out", str(data), "--images", "1", "--common", "1"])
    kw = {"device": "cpu", "dtype": torch.float32, "seed": 0, "root": data}
    generate_common_images("base", ["ball", "box"], 2, tmp_path / "cache", **kw)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(Loaded):  # a word the set lacks is still generated
        generate_common_images("base", ["ball", "star"], 2, tmp_path / "cache", **kw)


def _fake_demo(root: Path, fidelity_hits: int, kinds: list[str], text_alignment: float) -> Path:
    """A demo folder as scripts/demo.sh leaves it, with chosen numbers: a concept set, images, referee.json and
    eval/metrics.json."""
    from clif.toyworld.scoring import KINDS

    toyworld(["concepts", "--rung", "distinct", "--out", str(root / "concepts"), "--images", "1", "--common", "1"])
    rows = []
    for s in ("single", "pair"):
        (root / f"images-{s}").mkdir()
        Image.new("RGB", (64, 64)).save(root / f"images-{s}" / "contact_sheet.png")
    for i in range(4):
        img = root / "images-single" / f"{i}.png"
        Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
        rows.append({"prompt": "a <ball_a>", "want": ["ball_a"], "faithful": i < fidelity_hits, "image": str(img)})
    for i, k in enumerate(kinds):
        img = root / "images-pair" / f"{i}.png"
        Image.new("RGB", (32, 32)).save(img)
        rows.append({"prompt": "a <ball_a> on the left and a <box_b> on the right", "kind": k, "image": str(img)})
    ref = {"fidelity": fidelity_hits / 4, "n_single": 4, "n_pair": len(kinds), "rows": rows,
           "oracle_confusion": sum(k in ("missing", "swapped", "same", "mixture") for k in kinds) / len(kinds)}
    ref |= {f"pair_{k}": kinds.count(k) / len(kinds) for k in KINDS}
    (root / "referee.json").write_text(json.dumps(ref))
    (root / "eval").mkdir()
    summary = {"text_alignment": text_alignment, "image_alignment": 0.5, "attendance": None, "confusion_rate": None}
    (root / "eval" / "metrics.json").write_text(json.dumps(
        {"single": {"summary": summary}, "pair": {"summary": summary | {"attendance": 1.0, "confusion_rate": 0.25}}}))
    return root


def test_summary_is_read_from_the_demo_folder(tmp_path, capsys):
    kinds = ["correct"] * 4 + ["mixture"] * 3 + ["swapped"] * 2 + ["other"]  # every share its own number
    demo = _fake_demo(tmp_path / "a", 3, kinds, 1.234)
    capsys.readouterr()
    toyworld(["summary", str(demo), "--figure", str(tmp_path / "assets" / "sheet.png")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert str(demo / "contact_sheets.png") in lines[0] and str(demo / "images-pair" / "contact_sheet.png") in lines[0]
    assert "fidelity 0.75 (3 of 4 " in lines[1]
    assert "correct 0.40, confused 0.50 (swapped 0.20, mixture 0.30, other 0.10) of 10" in lines[2]
    ladder = json.loads((REPO / "pretrained/toyworld/ladder_results.json").read_text())["rungs"]["distinct"]["table"]
    assert f"CLIF {ladder['clif']['oracle_confusion'][0]:.2f} vs TI+LoRA" in lines[3]
    assert "single: text_alignment 1.23, image_alignment 0.50; pair: text_alignment 1.23" in lines[4]
    assert "attendance 1.00, confusion_rate 0.25" in lines[4]
    assert (demo / "contact_sheets.png").read_bytes() == (tmp_path / "assets" / "sheet.png").read_bytes()
    other = _fake_demo(tmp_path / "b", 4, ["correct"] * 4, 0.5)  # other files, other lines
    capsys.readouterr()
    toyworld(["summary", str(other)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "fidelity 1.00 (4 of 4 " in lines[1] and "confused 0.00 (none)" in lines[2]


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            "SETUP": "0", **extra}


def test_demo_refuses_an_unknown_flag_in_one_line(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--fast"], env=_env(DEMO_OUT=str(out)),
                       capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "usage" in r.stderr
    assert not out.exists()


@pytest.mark.heavy(75)
def test_demo_runs_on_the_toy_world_at_reduced_steps(tmp_path):
    """The whole demo path (concept set, stages 1-3 through the run_train_*.sh scripts, inference, evaluate.py, the
    referee, the summary) at 2 steps a stage: the summary it prints is the one its files give."""
    from clif.toyworld.demo import referee_read, summary_lines

    demo = tmp_path / "demo"
    steps = {"CLIF_STEPS": "2", "TI_STEPS": "2", "LORA_STEPS": "2", "IMAGES": "1", "INFERENCE_STEPS": "2"}
    r = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], env=_env(DEMO_OUT=str(demo), **steps),
                       capture_output=True, text=True, timeout=HANG_GUARD_S, check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout.strip().splitlines()[-5:]
    assert printed == summary_lines(demo)
    for path in re.findall(r"(/\S+\.png)", printed[0]):
        assert Path(path).is_file(), path
    # the stages ran in a chain at the asked steps, through the run_train_*.sh wrappers: their defaults hold where
    # the demo's flags do not override them
    args = {}
    for stage, prev in (("s1-clif", None), ("s2-ti", "s1-clif"), ("s3-lora", "s2-ti")):
        args[stage] = json.loads((demo / stage / "clif_manifest.json").read_text())["args"]
        assert args[stage]["max_train_steps"] == 2 and (prev is None or Path(args[stage]["stage_dir"]).name == prev)
    assert args["s1-clif"]["common_words"] in ("ball,box", ["ball", "box"]) and args["s1-clif"]["mix_ratio"] == 0.4
    assert args["s2-ti"]["cache_latents"] is True and list((demo / "s2-ti" / "logs").rglob("events.out.tfevents.*"))
    assert args["s3-lora"]["export_kohya"] is True and (demo / "s3-lora" / "s3-lora_kohya.safetensors").is_file()
    # referee.json is the referee's reading of the images the demo generated
    again = referee_read([demo / "images-single", demo / "images-pair"], demo / "concepts", tmp_path / "again.json")
    written = json.loads((demo / "referee.json").read_text())
    assert (written["n_single"], written["n_pair"]) == (4, 4)
    assert {k: v for k, v in written.items() if k != "rows"} == {k: v for k, v in again.items() if k != "rows"}
    metrics = json.loads((demo / "eval" / "metrics.json").read_text())
    assert f"text_alignment {metrics['pair']['summary']['text_alignment']:.2f}" in printed[4]
    parts = [ln.split()[0] for ln in (demo / "timings.txt").read_text().splitlines()]
    assert parts == ["concepts", "stage1", "stage2", "stage3", "images-single", "images-pair", "evaluate", "referee"]
