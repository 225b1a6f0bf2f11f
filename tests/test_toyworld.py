"""The toy world: generator determinism, masks and captions; the referee (trained on VAE round trips) and the
renderability gate; the ground-truth scoring of generated images; pretraining at tiny size feeds every stage;
the ladder experiment end to end at minimal steps; the committed world and its referee."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clif.toyworld.world import COLORS, Obj, Scene, random_scene, render, render_batch
from clif.toyworld.models import VISION_SHARD

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "pretrained" / "toyworld"


def test_generator_is_deterministic_and_seed_dependent():
    a_img, a_cap = render_batch(3, 8)
    b_img, b_cap = render_batch(3, 8)
    c_img, c_cap = render_batch(4, 8)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap


def test_masks_match_objects_and_captions_name_what_is_drawn():
    scene = Scene(
        (Obj("ball", "red", slot="left"), Obj("box", "blue", "top", "yellow", slot="right")),
        background=(200, 200, 200),
    )
    img, masks = render(scene, 32)
    a = np.asarray(img).astype(int)
    left, right = (np.asarray(m) > 0 for m in masks)
    assert left[:, :16].sum() > 0.95 * left.sum() and right[:, 16:].sum() > 0.95 * right.sum()
    assert np.abs(a[left].mean(0) - COLORS["red"]).max() < 30
    # the box's top half is yellow, its bottom half blue
    rows = np.nonzero(right.any(1))[0]
    top, bottom = right.copy(), right.copy()
    top[rows.mean().astype(int) :] = False
    bottom[: rows.mean().astype(int) + 1] = False
    assert np.abs(a[top].mean(0) - COLORS["yellow"]).max() < 40
    assert np.abs(a[bottom].mean(0) - COLORS["blue"]).max() < 40
    assert np.abs(a[~(left | right)].mean(0) - 200).max() < 10
    assert scene.caption() == "a red ball on the left and a blue box with a yellow top on the right"


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


class InvertingVAE:
    """A stand-in VAE whose round trip inverts colours: a referee that really trains on round trips reads
    inverted images; one trained on the renders themselves cannot."""

    class _Out:
        def __init__(self, x):
            self.latent_dist = type("D", (), {"mean": x})()
            self.sample = x

    def encode(self, x):
        return self._Out(x)

    def decode(self, z):
        return self._Out(-z)


@pytest.fixture(scope="module")
def referee(tmp_path_factory):
    """Trained once per session (built_once): 250 steps reach layout and count 1.00, colour 0.99, class 0.94, mark
    0.81 on the held-out round trips, against the test's 0.9 / 0.8 / 0.7 / 0.6."""
    from conftest import built_once

    from clif.toyworld.referee import Referee, train_referee

    torch.set_num_threads(1)
    folder = built_once(
        tmp_path_factory, "referee", lambda out: train_referee(InvertingVAE(), 32, out, n_train=2000, steps=250, seed=0)
    )
    return Referee.load(folder)


@pytest.mark.heavy(30)
def test_referee_learns_the_round_trips_it_is_shown(referee):
    rt = referee.meta["heldout_round_trip_accuracy"]
    raw = referee.meta["heldout_render_accuracy"]
    assert rt["layout"] >= 0.9 and rt["count"] >= 0.9, rt
    assert rt["color"] >= 0.8 and rt["cls"] >= 0.7 and rt["pattern"] >= 0.6, rt
    assert raw["color"] < 0.5, raw  # renders it was not trained on (not inverted) are read wrongly


def test_referee_reads_left_as_left_and_right_as_right(referee):
    from clif.toyworld.referee import vae_round_trip

    scenes = [
        Scene((Obj("ball", "red", slot="left"), Obj("box", "blue", slot="right")), (225, 225, 225)),
        Scene((Obj("box", "blue", slot="left"), Obj("ball", "red", slot="right")), (225, 225, 225)),
    ]
    imgs = vae_round_trip(InvertingVAE(), np.stack([np.asarray(render(s, 32)[0]) for s in scenes]))
    first, second = referee.read(imgs)
    assert first.layout == second.layout == "left+right"
    assert (first.slots["left"].color, first.slots["right"].color) == ("red", "blue")
    assert (second.slots["left"].color, second.slots["right"].color) == ("blue", "red")


def test_gate_passes_the_ceiling_and_fails_mismatched_samples(referee):
    from clif.toyworld.gate import evaluate_gate, gate_scenes, gate_table
    from clif.toyworld.referee import vae_round_trip

    scenes = gate_scenes(60, seed=7)
    rts = vae_round_trip(InvertingVAE(), np.stack([np.asarray(render(s, 32)[0]) for s in scenes]))
    good = evaluate_gate(rts, scenes, referee, ceiling=rts)
    assert good["rows"]["count"]["samples"] == good["rows"]["count"]["ceiling"] >= 0.9
    shuffled = evaluate_gate(rts[::-1].copy(), scenes, referee)
    assert not shuffled["passed"] and shuffled["rows"]["color"]["samples"] < 0.5
    assert shuffled["rows"]["color"]["passed"] is False
    table = gate_table(good)
    assert "body colour" in table and "mark colour" in table and table.count("\n|") == 8


def _read(left: Obj | None, right: Obj | None):
    from clif.toyworld.referee import Read

    lay = "+".join(s for s, o in (("left", left), ("right", right)) if o is not None) or "none"
    return Read(lay, {"left": left, "right": right, "center": None})


def test_scoring_names_each_kind_of_confusion():
    from clif.toyworld.scoring import CONFUSION_KINDS, pair_kind, score_images

    a, b = Obj("ball", "red"), Obj("box", "blue")
    concepts = {"a": a, "b": b}
    red_box, green_star = Obj("box", "red"), Obj("star", "green")
    want = ("a", "b")
    assert pair_kind(_read(a, b), want, concepts) == "correct"
    assert pair_kind(_read(b, a), want, concepts) == "swapped"
    assert pair_kind(_read(a, a), want, concepts) == "same"
    assert pair_kind(_read(a, None), want, concepts) == "missing"
    assert pair_kind(_read(a, red_box), want, concepts) == "mixture"
    assert pair_kind(_read(a, Obj("ball", "red", "top", "blue")), want, concepts) == "mixture"  # red ball, blue top
    assert pair_kind(_read(a, green_star), want, concepts) == "other"
    assert pair_kind(_read(a, Obj("star", "red", "band", "green")), want, concepts) == "other"  # only a's red
    band, spot = Obj("ball", "yellow", "band", "purple"), Obj("ball", "yellow", "spot", "black")
    marks = {"a": band, "b": spot}
    assert pair_kind(_read(band, Obj("ball", "yellow", "spot", "purple")), want, marks) == "mixture"
    assert pair_kind(_read(band, Obj("ball", "yellow")), want, marks) == "other"  # no mark: neither's
    prompts = ["a <a> on the left and a <b> on the right", "a <b> on the left and a <a> on the right", "a <a>"]
    s = score_images([_read(a, b), _read(a, b), _read(None, a)], prompts, concepts)
    assert (s["pair_correct"], s["pair_swapped"], s["oracle_confusion"], s["fidelity"]) == (0.5, 0.5, 0.5, 1.0)
    assert set(CONFUSION_KINDS) == {"missing", "swapped", "same", "mixture"}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    """The pretraining command at its test preset (2 steps per part), run in-process, once per session."""
    from conftest import built_once

    from clif.toyworld.__main__ import main

    return built_once(
        tmp_path_factory,
        "tiny_world",
        lambda out: main(["pretrain", "--out", str(out), "--preset", "test", "--no_grids", "--threads", "1"]),
    )


def test_pretrain_writes_a_pipeline_with_paired_clip(tiny_world, tmp_path):
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
    # resuming a finished run trains nothing and rewrites the same weights (on a copy: the world is shared)
    import shutil

    from clif.toyworld.__main__ import main

    copy = tmp_path / "world"
    shutil.copytree(tiny_world, copy)
    shutil.copytree(tiny_world.with_name(tiny_world.name + ".work"), tmp_path / "world.work")
    before = load_file(str(tiny_world / "unet" / "diffusion_pytorch_model.safetensors"))
    main(["pretrain", "--out", str(copy), "--preset", "test", "--no_grids", "--threads", "1"])
    after = load_file(str(copy / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compact_world_loads_as_float32_with_rounded_weights(tiny_world, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    from clif.toyworld.__main__ import main

    copy = tmp_path / "world"
    shutil.copytree(tiny_world, copy)
    main(["compact", str(copy)])
    a = UNet2DConditionModel.from_pretrained(tiny_world / "unet")
    b = UNet2DConditionModel.from_pretrained(copy / "unet")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert vb.dtype == torch.float32 and torch.equal(va.half().float(), vb), k
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.safetensors"))  # noqa: E731
    assert size(copy) < 0.6 * size(tiny_world)
    # the CLIP text tower is stored once (text_encoder/), and both loaders read the same rounded tensors
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPModel

    assert not (copy / "paired_clip" / "model.safetensors").exists()
    assert not any(k.startswith("text_model.") for k in load_file(str(copy / "paired_clip" / VISION_SHARD)))
    full, shared = CLIPModel.from_pretrained(tiny_world / "paired_clip"), CLIPModel.from_pretrained(copy / "paired_clip")
    for (k, va), vb in zip(full.state_dict().items(), shared.state_dict().values()):
        assert torch.equal(va.half().float(), vb), k
    pipe = StableDiffusionPipeline.from_pretrained(copy, safety_checker=None)
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, shared.text_model.state_dict()[k]), k
    main(["compact", str(copy)])  # a second compact changes nothing
    assert CLIPModel.from_pretrained(copy / "paired_clip").state_dict()["logit_scale"] == shared.logit_scale


def test_gate_command_on_a_tiny_world(tiny_world, tmp_path):
    """The gate end to end on the tiny world: referee trained on its VAE's round trips, samples, table."""
    from clif.toyworld.__main__ import main

    out = tmp_path / "gate"
    flags = ["--captions", "6", "--referee_scenes", "32", "--referee_steps", "2", "--threads", "1"]
    main(["gate", "--base", str(tiny_world), "--referee", str(tmp_path / "ref"), "--out", str(out), *flags])
    gate = json.loads((out / "gate.json").read_text())
    assert gate["n"] == 6 and set(gate["rows"]) >= {"count", "layout", "color", "cls", "pattern", "pattern_color"}
    assert all(0 <= r["samples"] <= 1 and 0 <= r["ceiling"] <= 1 for r in gate["rows"].values())
    assert (tmp_path / "ref" / "referee.safetensors").is_file() and (out / "gate_samples.png").is_file()


@pytest.mark.heavy(90)
def test_ladder_experiment_end_to_end(tiny_world, tmp_path):
    """Every stage (stage-1 variants included), inference and evaluate.py accept the world; the ladder table, the
    text side after each stage and the figures are written; variants run only where TI+LoRA qualifies."""
    from clif.toyworld.__main__ import main

    out = tmp_path / "exp"
    flags = "--seeds 0 --clif_steps 2 --ti_steps 2 --lora_steps 2 --images_per_prompt 1 --inference_steps 2"
    flags += " --gate_captions 4 --referee_scenes 32 --referee_steps 2 --rungs distinct"
    methods = ["--methods", "ti_lora", "clif_frozen"]  # stage 2 then 3; stage 1 then 3 (stage 1's rows frozen)
    main(["experiment", *flags.split(" "), *methods, "--variants_on", "all", "--base", str(tiny_world), "--out",
          str(out)])
    res = json.loads((out / "results.json").read_text())
    rung = res["rungs"]["distinct"]
    assert set(rung["table"]) == {"ti_lora", "clif_frozen"}
    for m in rung["table"]:
        row = rung["per_seed"][m][0]
        assert (row["n_single"], row["n_pair"]) == (4, 4)
        kinds = sum(row[f"pair_{k}"] for k in ("correct", "missing", "swapped", "same", "mixture", "other"))
        assert abs(kinds - 1) < 1e-9
    # the text side after each stage the method ran: 1 = stage 1, 2 = stage 2, 3 = stage 3
    stages = {m: sorted(int(k[4]) for k in rung["per_seed"][m][0] if k.startswith("leak") and k.endswith("_fwd"))
              for m in rung["table"]}
    assert stages == {"ti_lora": [2, 3], "clif_frozen": [1, 3]}
    assert all(0 <= rung["per_seed"]["clif_frozen"][0][f"retrieval{n}"] <= 1 for n in (1, 3))
    assert set(rung["words"]) == {"leak_fwd", "leak_rev"}
    seed0 = out / "distinct" / "seed0"
    assert json.loads((seed0 / "clif-lora_frozen" / "run_args.json").read_text())["embedding_learning_rate"] == 0
    assert (out / "distinct" / "concepts" / "common" / "ball" / "masks" / "00.png").is_file()
    agree = res["metric_vs_referee"]
    # 4 two-concept images x 2 methods, pooled
    assert agree["images"] == 8 and set(agree) >= {"clip_confusion", "dc", "oracle_confusion"}
    md = (out / "results.md").read_text()
    assert "against the referee" in md and "Renderability gate" in md and "| distinct | CLIF rows frozen after stage 1 |" in md
    assert "Text side after each stage" in md and "Decision (fixed before the runs)" in md
    for f in ("ladder.png", "leak.png", "side_by_side_distinct.png"):
        assert (out / f).is_file()
    # --aggregate_only trains nothing: a method not run to its end (clif: its stage 1 is clif_frozen's, its stages 2
    # and 3 never ran) is left out, the finished ones are scored again
    main(["experiment", *flags.split(" "), "--methods", "ti_lora", "clif", "clif_frozen", "--variants_on", "all",
          "--aggregate_only", "--base", str(tiny_world), "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert set(res["rungs"]["distinct"]["table"]) == {"ti_lora", "clif_frozen"}
    assert not (seed0 / "clif-ti").exists()
    # by default the variants run only where TI+LoRA qualifies (fidelity >= 0.7, confusion >= 0.3)
    main(["experiment", *flags.split(" "), *methods, "--base", str(tiny_world), "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    qualified = res["rungs"]["distinct"]["qualifies"]
    assert set(res["rungs"]["distinct"]["table"]) == ({"ti_lora", "clif_frozen"} if qualified
                                                        else {"ti_lora"})


def test_committed_world_loads_and_its_referee_reads_round_trips():
    from diffusers import StableDiffusionPipeline

    from clif.toyworld.referee import Referee, render_training_scenes, score_reads, vae_round_trip

    pipe = StableDiffusionPipeline.from_pretrained(COMMITTED / "model", safety_checker=None)
    img = pipe("a red ball", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert img.images.shape[1:3] == (32, 32)
    from transformers import CLIPModel  # paired_clip/ reads its text tower from text_encoder/ (stored once)

    clip = CLIPModel.from_pretrained(COMMITTED / "model" / "paired_clip")
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, clip.text_model.state_dict()[k]), k
    referee = Referee.load(COMMITTED / "referee")
    imgs, scenes = render_training_scenes(200, 32, seed=4242)
    acc = score_reads(referee.read(vae_round_trip(pipe.vae, imgs)), scenes)
    assert acc["layout"] >= 0.95 and acc["color"] >= 0.95 and acc["pattern"] >= 0.9, acc


def test_unet_stop_at_keeps_the_full_schedule_and_resumes_to_its_end(tmp_path):
    """--unet_stop_at stops early on the full schedule's learning rates; a later run finishes the schedule."""
    from clif.toyworld.models import Config
    from clif.toyworld.pretrain import train_part

    def run(work, steps, stop_at):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        x = torch.randn(16, 3)
        log = train_part(
            Config(), work, "unet", model, steps, 0.1, lambda s: model(x).pow(2).mean(), 100, stop_at=stop_at
        )
        return log, torch.load(work / "unet.ckpt", weights_only=True)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    log_a, ck_a = run(tmp_path / "a", 10, 4)
    log_b, ck_b = run(tmp_path / "b", 4, None)
    assert ck_a["step"] == ck_b["step"] == 4 and len(log_a) == 4
    assert ck_a["sched"]["_last_lr"] != ck_b["sched"]["_last_lr"]  # 4 of 10 steps is not the end of a 4-step schedule
    log_full, ck_full = run(tmp_path / "a", 10, None)  # resumes at 4, runs to 10
    assert ck_full["step"] == 10 and len(log_full) == 10 and log_full[:4] == log_a


@pytest.mark.parametrize(
    "results, block, docs",
    [
        ("ladder_results.json", "results", {"docs/toyworld.md": "results"}),
        ("composition_results.json", "composition", {"docs/toyworld.md": "composition", "README.md": "composition-headline"}),
    ],
)
def test_toyworld_blocks_are_generated_from_the_committed_results(results, block, docs, tmp_path, monkeypatch):
    """docs/toyworld.md's tables and the README's headline are exactly what `python -m clif.toyworld readme` writes
    from the committed results JSON: no hand-typed numbers."""
    import shutil

    from clif.toyworld.__main__ import main as toyworld
    from clif.toyworld.report import markers

    before = {}
    for name, marks in docs.items():
        begin, end = markers(marks)
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
        before[name] = (tmp_path / name).read_text()
        assert before[name].count(begin) == 1 and before[name].count(end) == 1
        head, rest = before[name].split(begin)
        inside, tail = rest.split(end)
        assert "work" in inside  # the decision stands in every block
        (tmp_path / name).write_text(head + begin + inside.replace("work", "stale") + end + tail)  # to be rewritten
    (tmp_path / "pretrained" / "toyworld").mkdir(parents=True)  # the block names the JSON by its repository path
    shutil.copy(REPO / "pretrained/toyworld" / results, tmp_path / "pretrained/toyworld")
    monkeypatch.chdir(tmp_path)
    toyworld(["readme", "--results", f"pretrained/toyworld/{results}", "--block", block])  # default documents
    assert {name: (tmp_path / name).read_text() for name in before} == before