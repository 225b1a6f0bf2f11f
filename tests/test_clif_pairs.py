"""Stage-1 pairs: automatic regions, held-out photos, caption templates, and their bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, needs_data, run_cli
from PIL import Image

import train_clif
from clif.concepts import load_concept_set
from clif.contrastive import augment
from clif.contrastive.augment import PairBuilder
from clif.contrastive.captions import LEFT_RIGHT, SINGLE, Templates
from clif.contrastive.confusion import ConfusionProbe
from clif.contrastive.regions import RegionSpec, over_segment
from clif.fixtures.synthetic import write_concept_set

RATIOS = {"global": 0.4, "region": 0.2, "mix": 0.4}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """3 synthetic concepts with masks, 4 photos each, no part names: regions are automatic."""
    return write_concept_set(tmp_path_factory.mktemp("three") / "set", n_concepts=3, n_images=4, size=96, seed=1)


def clif_args(model, data, out, cache, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--cache_dir", str(cache), "--report_to", "none", "--num_pairs", "48", "--train_batch_size", "8",
            "--max_train_steps", "2", *extra]


@needs_data("break-a-scene-mini")
def test_regions_split_the_mask_reproducibly():
    scene = SHARED_DATA / "break-a-scene-mini" / "bear"
    image = Image.open(scene / "img.jpg").convert("RGB")
    mask = np.asarray(Image.open(scene / "mask0.png").convert("L").resize(image.size)) >= 128
    spec = RegionSpec(segments=8, min_area=0.05, per_image=3)
    regions = over_segment(image, mask, spec)
    assert len(regions) == 3  # a 3400-px bear: 4 regions large enough, the 3 largest kept
    areas = [int(r.sum()) for r in regions]
    assert areas == sorted(areas, reverse=True) and min(areas) >= max(0.005 * mask.size, 0.05 * mask.sum())
    assert all(not (r & ~mask).any() for r in regions)  # inside the concept's mask
    assert int(np.sum(regions, axis=0).max()) == 1  # disjoint
    again = over_segment(image, mask, spec)
    assert all(np.array_equal(a, b) for a, b in zip(regions, again))


def test_region_pairs_are_the_concepts_own_pieces(three, tmp_path):
    """No part names: Region pairs are over-segmented pieces captioned with the concept's token (other concepts'
    regions are negatives); a concept with part masks keeps its user parts."""
    root = tmp_path / "set"
    shutil.copytree(three, root)
    spec = json.loads((root / "concepts.json").read_text())
    spec["concepts"][0]["parts"] = ["top"]
    for m in sorted((root / "masks" / spec["concepts"][0]["name"]).glob("*.png")):
        a = np.asarray(Image.open(m)).copy()
        a[a.shape[0] // 2:] = 0
        Image.fromarray(a).save(m.with_name(f"{m.stem}__top.png"))
    (root / "concepts.json").write_text(json.dumps(spec))
    concepts = load_concept_set(root)
    builder = PairBuilder(concepts, size=64, segmenter=None, regions=RegionSpec(), seed=0)
    first, *rest = builder.parts
    assert {p.phrase for p in first} == {f"{concepts[0].token}'s top"}  # user parts take precedence
    for c, pieces, wholes in zip(concepts[1:], rest, builder.wholes[1:]):
        assert len(pieces) > len(wholes)  # several regions per photo
        assert {p.phrase for p in pieces} == {c.token}
        for p in pieces:  # each region is a strict part of its photo's whole cut-out
            whole = next(w for w in wholes if w.source == p.source)
            assert (np.asarray(p.image)[..., 3] > 0).sum() < (np.asarray(whole.image)[..., 3] > 0).sum()
    pairs = builder.build(60, RATIOS, seed=3)
    region = [p for p in pairs if p.kind == "region"]
    assert region and all(p.key in {(c.token,) for c in concepts[1:]} | {(f"{concepts[0].token}'s top",)}
                          for p in region)
    again = PairBuilder(concepts, size=64, segmenter=None, regions=RegionSpec(), seed=0).build(60, RATIOS, seed=3)
    assert [p.caption for p in pairs] == [p.caption for p in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(pairs, again))


def test_held_out_photos_never_reach_a_pair(three):
    concepts = load_concept_set(three)
    builder = PairBuilder(concepts, size=64, segmenter=None, regions=RegionSpec(), holdout=1, seed=4)
    assert all(len(h) == 1 and h[0] in c.images for h, c in zip(builder.held_files, concepts))
    held = {p for h in builder.held_files for p in h}
    used = {p.source for ps in builder.wholes + builder.parts for p in ps}
    assert used and not used & held
    assert {p.source for ps in builder.held_wholes for p in ps} == held
    pairs = builder.build(80, RATIOS, seed=2)
    assert all(p.sources and not set(p.sources) & held for p in pairs)
    views = builder.views(3, seed=1, held_out=True)
    assert len(views) == 9 and all(v.kind == "view" and set(v.sources) <= held for v in views)
    assert not {s for v in builder.views(3, seed=1, held_out=False) for s in v.sources} & held

    class Paired:  # frozen image features, as PairedCLIP computes them
        def image_features(self, images):
            return torch.zeros(len(images), 4)

    probe = ConfusionProbe(builder, [Paired()], 2, seed=0)
    assert {s for v in probe.sets["held_out"] for s in v.sources} == held
    assert not {s for v in probe.sets["train_views"] for s in v.sources} & held
    # another seed holds out other photos; concepts with < 3 photos hold out none
    other = PairBuilder(concepts, size=64, segmenter=None, holdout=1, seed=5)
    assert other.held_files != builder.held_files
    assert PairBuilder(concepts, size=64, segmenter=None, holdout=3, seed=4).held_files == [[], [], []]
    # the report states the rule that applied: holdout + 2 photos (4 photos hold 2 out, not 3)
    two = ConfusionProbe(PairBuilder(concepts, size=64, segmenter=None, holdout=2, seed=4), [Paired()], 2, seed=0)
    assert "held_out" in two.sets
    none = ConfusionProbe(PairBuilder(concepts, size=64, segmenter=None, holdout=3, seed=4), [Paired()], 2, seed=0)
    assert "held_out" not in none.sets and ">= 5 images (--holdout_images 3 + 2" in none.no_held_out


def test_pairs_naming_the_same_thing_are_positives(three):
    """Two templates around one token are one positive class; captions alone would split them."""
    from clif.contrastive.losses import multi_positive_targets

    keys = [("<a>",), ("<a>",), ("<b>",), ("<a>", "a chef")]
    t = multi_positive_targets(keys, "cpu")
    assert torch.equal(t, torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]]))
    from clif.contrastive.captions import Templates as T

    builder = PairBuilder(load_concept_set(three), size=32, segmenter=None, templates=T())
    pairs = builder.build(40, {"global": 1.0}, seed=0)
    same = [p.caption for p in pairs if p.key == pairs[0].key]
    assert len(set(same)) > 1  # one key, several captions: the loss sees one positive class


def test_templates_vary_with_the_seed():
    t, phrases = Templates(), ["<a>"]
    import random

    one = [t.caption(phrases, random.Random(s)) for s in range(40)]
    assert one == [t.caption(phrases, random.Random(s)) for s in range(40)]
    assert len(set(one)) >= 4 and set(one) <= {x.replace("{}", "<a>") for x in SINGLE}
    two = {t.caption(["<a>", "a chef"], random.Random(s)) for s in range(40)}
    assert len(two) >= 3 and two <= {x.replace("{}", "<a>", 1).replace("{}", "a chef", 1) for x in LEFT_RIGHT}
    only = Templates(("a sketch of {}",), ())
    assert only.caption(["<a>", "<b>"], random.Random(0)) == "a sketch of <a> on the left and <b> on the right"


def test_template_file_is_used(tiny_sd15, concept_set, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# mine\nan oil painting of {}\n\n{} at left, {} at right\n")
    out = tmp_path / "s1"
    preview = tmp_path / "preview"
    augment.main(["--train_data_dir", str(concept_set), "--out", str(preview), "--num_pairs", "12", "--size", "64",
                  "--caption_templates", str(path)])
    caps = [c["caption"] for c in json.loads((preview / "captions.json").read_text())]
    assert all(c.startswith("an oil painting of <") or " at left, " in c for c in caps)
    assert any(" at left, " in c for c in caps)
    for c in load_concept_set(concept_set):  # the preview shows each photo's regions
        assert len(list((preview / "regions" / c.name).glob("*.png"))) == len(c.images) - 1  # 1 held out
    train_clif.main(clif_args(tiny_sd15, concept_set, out, tmp_path / "c", "--caption_templates", str(path)))
    assert json.loads((out / "clif_manifest.json").read_text())["args"]["caption_templates"] == str(path)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_confusion_json_says_which_views(family, tiny_models, concept_set, tmp_path):
    out = tmp_path / "s1"
    train_clif.main(clif_args(tiny_models[family], concept_set, out, tmp_path / "c"))
    conf = json.loads((out / "confusion.json").read_text())
    held, train = conf["held_out"], conf["train_views"]
    assert "held out" in held["views"] and "optimistic" in train["views"]
    assert all(len(v) == 1 for v in held["images"].values())  # 3 photos each: one held out
    for res in (held["before"], held["after"], train["before"], train["after"]):
        assert np.asarray(res["matrix"]).shape == (2, 2) and 0 <= res["accuracy"] <= 1
    img = Image.open(out / "confusion.png")
    assert img.size[0] > 400 and img.size[1] > 400  # a matplotlib figure with two rows of two panels


def test_stage1_pair_bad_inputs(tiny_sd15, concept_set, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}\na photo without a slot\n")
    cases = [
        (["--caption_templates", str(bad)], "bad.txt:2"),
        (["--caption_templates", str(tmp_path / "missing.txt")], "cannot read caption templates"),
        (["--min_region_area", "0.9"], "no region of its mask"),
        (["--min_region_area", "1.5"], "--min_region_area"),
        (["--text_chunk_size", "0"], "--text_chunk_size"),
        (["--text_chunk_size", "-3"], "--text_chunk_size"),
    ]
    for extra, text in cases:
        code, err = run_cli(train_clif.main, clif_args(tiny_sd15, concept_set, out, tmp_path / "c", *extra), capsys)
        assert code == 2 and text in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()
    code, err = run_cli(augment.main, ["--train_data_dir", str(concept_set), "--out", str(out), "--caption_templates",
                                       str(bad)], capsys)
    assert code == 2 and "bad.txt:2" in err and not out.exists()


def test_first_step_loss_is_infonce_with_same_subject_positives(tiny_sd15, concept_set, tmp_path):
    """Replays stage 1's first batch: the logged loss is the symmetric InfoNCE whose positives are the pairs that
    name the same subjects (keys), not the pairs with identical caption strings."""
    from clif.contrastive.common_concepts import common_images
    from clif.contrastive.losses import clip_loss
    from clif.contrastive.paired import PairedCLIP, clip_image_size, default_pair
    from clif.contrastive.text_side import TextSide
    from clif.train.stage import install_embeddings, prepare
    from clif.train.training import NoiseSource

    templates = tmp_path / "t.txt"
    templates.write_text("a photo of {}\na picture of {}\n")
    out = tmp_path / "s1"
    argv = clif_args(tiny_sd15, concept_set, out, tmp_path / "c", "--caption_templates", str(templates),
                     "--train_batch_size", "16", "--max_train_steps", "1", "--mixed_precision", "no")
    train_clif.main(argv)
    logged = json.loads((out / "run_stats.json").read_text())["losses"][0]

    args = train_clif.build_parser().parse_args([*argv[:5], str(tmp_path / "replay"), *argv[6:]])
    inp = prepare(args, text_only=True)
    clip = default_pair(str(tiny_sd15), 0, inp.model.text_encoders[0].config.hidden_size)
    builder = augment.builder_from_args(args, inp.concepts, size=clip_image_size(clip), segmenter=None, regions=True)
    builder.add_common(common_images(concept_set, [], tmp_path / "c"))
    pairs = builder.build(args.num_pairs, {"global": 0.4, "region": 0.2, "mix": 0.4}, args.seed)
    install_embeddings(inp)
    paired = [PairedCLIP(clip, inp.model.text_encoders[0], "cpu", torch.float32)]
    text = TextSide(inp.model, paired, inp.concepts)
    idx = torch.randint(len(pairs), (16,), generator=NoiseSource(args.seed, torch.device("cpu"), 16, 0, 16).gen)
    image = paired[0].image_features([pairs[i].image for i in idx])
    with torch.no_grad():
        (feats,) = text.features([pairs[i].caption for i in idx])
    by_key = clip_loss(feats, image, [pairs[i].key for i in idx], paired[0].logit_scale)
    by_caption = clip_loss(feats, image, [pairs[i].caption for i in idx], paired[0].logit_scale)
    assert abs(float(by_key) - logged) <= 1e-5 * abs(logged)
    assert abs(float(by_caption) - logged) > 1e-3  # the replay can tell the two apart
