"""Unequal image counts (issue 23): --concept_balance and per-concept `repeats` share the samples of stages 2 and 3
and the Global/Region pairs of stage 1; the stream stays a pure function of (seed, sample index); run_stats.json
and the model card say how many samples each concept got; a resume with other repeats or balance is refused."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import lora_args, ti_args
from safetensors.torch import load_file

import train_clif
import train_lora
import train_ti
from clif import cli, seeds
from clif.concepts import concept_slots, load_concept_set
from clif.contrastive import augment
from clif.contrastive.augment import PairBuilder, builder_from_args
from clif.contrastive.regions import RegionSpec
from clif.errors import UserError
from clif.fixtures.synthetic import write_concept_set
from clif.outputs.artifacts import MANIFEST, atomic_write_json
from clif.outputs.checkpoint import check_resumable
from clif.tokens import expand_prompt
from clif.train.data import ConceptImages

COUNTS = [5, 2]  # redball has 5 images, bluebox 2


@pytest.fixture(scope="module")
def unequal(tmp_path_factory) -> Path:
    """Two synthetic concepts with masks, 5 and 2 images."""
    return write_concept_set(tmp_path_factory.mktemp("unequal") / "set", n_concepts=2, n_images=COUNTS, size=96,
                             seed=3)


def with_repeats(src: Path, dst: Path, repeats: list[int]) -> Path:
    """A copy of concept set `src` whose concepts carry `repeats`."""
    shutil.copytree(src, dst)
    spec = json.loads((dst / "concepts.json").read_text())
    for entry, r in zip(spec["concepts"], repeats):
        entry["repeats"] = r
    (dst / "concepts.json").write_text(json.dumps(spec))
    return dst


def stream(root: Path, balance: str, seed: int = 0, **kw) -> ConceptImages:
    return ConceptImages(load_concept_set(root), 16, False, seed=seed, balance=balance, **kw)


def owners(data: ConceptImages, n: int) -> list[int]:
    """The concept of each of the first n samples, read one micro-batch of one sample at a time."""
    return [int(data.owner[data.micro_batch(k, 1).image_index[0]]) for k in range(n)]


# ---- the share of each concept


def test_concept_slots():
    assert concept_slots([5, 2], [1, 1], "images") == [5, 2]
    assert concept_slots([5, 2], [1, 3], "images") == [5, 6]  # kohya: every image `repeats` times
    assert concept_slots([5, 2], [1, 1], "concepts") == [5, 5]  # the largest concept's count is the unit
    assert concept_slots([5, 2], [1, 3], "concepts") == [5, 15]
    assert concept_slots([5, 2], [2, 2], "concepts") == [5, 5]  # relative weights
    assert concept_slots([5, 0, 2], [1, 1, 1], "concepts") == [5, 0, 5]  # no items, no share
    with pytest.raises(ValueError):
        concept_slots([1], [1], "pairs")


@pytest.mark.parametrize(
    "balance,repeats,share",
    [("concepts", [1, 1], [5, 5]), ("images", [1, 1], [5, 2]), ("concepts", [1, 3], [5, 15]),
     ("images", [1, 3], [5, 6]), ("images", [2, 2], [10, 4])],
)  # fmt: skip
def test_every_epoch_gives_each_concept_its_share(balance, repeats, share, unequal, tmp_path):
    """Each epoch of the stream holds exactly the concept's share; within a concept every image appears, as evenly
    as the share allows."""
    data = stream(with_repeats(unequal, tmp_path / "s", repeats), balance)
    size = data.epoch_length
    assert size == sum(share)
    for e in range(3):
        images = Counter(int(i) for i in data._epoch(e)[0])
        assert [sum(images[i] for i in range(f, f + n)) for f, n in zip(data.first, COUNTS)] == share
        for f, n, s in zip(data.first, COUNTS, share):
            assert {images[i] for i in range(f, f + n)} <= {s // n, -(-s // n)}
    seen = owners(data, 3 * size)
    assert [seen.count(c) for c in range(2)] == [3 * s for s in share]


def test_the_rest_of_a_share_is_distinct_images_drawn_anew(unequal):
    """A share that is no multiple of the image count (5 samples for 3 images): every image once, two of them
    twice (never one image three times), and which two changes from epoch to epoch."""
    concepts = load_concept_set(unequal)
    concepts[1].images = [*concepts[1].images, concepts[0].images[0]]  # 5 and 3 images
    data = ConceptImages(concepts, 16, False, seed=2, balance="concepts")
    assert data.slots == [5, 5]
    twice = set()
    for e in range(20):
        seen = Counter(int(i) for i in data._epoch(e)[0] if i >= 5)
        assert sorted(seen.values()) == [1, 2, 2]
        twice.add(frozenset(i for i, k in seen.items() if k == 2))
    assert len(twice) == 3


def test_samples_per_concept_counts_the_stream(unequal):
    for balance in ("concepts", "images"):
        data = stream(unequal, balance, seed=4)
        for n in (0, 3, data.epoch_length, 2 * data.epoch_length + 3):
            seen = owners(data, n)
            assert data.samples_per_concept(n) == {"redball": seen.count(0), "bluebox": seen.count(1)}


def old_stream(data: ConceptImages, j: int) -> tuple[int, bool, int]:
    """Sample j as the stream drew it before --concept_balance existed: a permutation of the images per epoch."""
    n = len(data)
    g = torch.Generator().manual_seed(seeds.element(data.seed, j // n))
    perm = torch.randperm(n, generator=g)
    flip = (torch.rand(n, generator=g) < 0.5) & data.random_flip
    tmpl = torch.randint(len(data.templates), (n,), generator=g)
    return int(perm[j % n]), bool(flip[j % n]), int(tmpl[j % n])


def test_images_balance_is_the_old_stream_and_equal_counts_make_no_difference(unequal, concept_set):
    """`images` (repeats 1) draws exactly what every run drew before; with equal counts `concepts` does too, so
    runs on balanced sets (the toy world's) keep their numbers."""
    cases = [(unequal, "images"), (concept_set, "images"), (concept_set, "concepts")]
    for root, balance in cases:
        data = stream(root, balance, seed=7, random_flip=True)
        for j in range(3 * len(data)):
            s = data.micro_batch(j, 1)
            want = old_stream(data, j)
            assert (int(s.image_index[0]), bool(s.flip[0])) == want[:2]
            c = data.concepts[int(data.owner[want[0]])]
            assert s.captions[0] == expand_prompt(data.templates[want[2]].format(c.token), data.concepts)
    assert owners(stream(unequal, "concepts"), 14) != owners(stream(unequal, "images"), 14)


# ---- a pure function of (seed, sample index)


def test_stream_is_a_pure_function_of_seed_and_index(unequal):
    """Same seed, same samples, in any order of reading (a resume starts mid-stream) and on any number of
    processes (rank r of W reads its slice of the same global batch); another seed, other samples."""
    a = stream(unequal, "concepts", seed=11, random_flip=True)
    b = stream(unequal, "concepts", seed=11, random_flip=True)
    ks = range(12)  # 12 micro-batches of 4: past the 10-sample epoch several times
    first = [a.micro_batch(k, 4) for k in ks]
    backwards = [b.micro_batch(k, 4) for k in reversed(ks)][::-1]
    for x, y in zip(first, backwards):
        assert torch.equal(x.image_index, y.image_index) and torch.equal(x.flip, y.flip) and x.captions == y.captions
        assert torch.equal(x.pixels, y.pixels)
    for world in (2, 4):
        local = 4 // world
        for k in ks:
            parts = [b.micro_batch(k, 4, rank, local) for rank in range(world)]
            assert torch.equal(torch.cat([p.image_index for p in parts]), first[k].image_index)
            assert [cap for p in parts for cap in p.captions] == first[k].captions
    other = stream(unequal, "concepts", seed=12, random_flip=True)
    assert [other.micro_batch(k, 4).captions for k in ks] != [x.captions for x in first]


# ---- stage 1: Global and Region pairs


def pair_share(builder: PairBuilder, kind: str, n: int = 400) -> list[int]:
    pairs = builder.build(n, {kind: 1.0}, seed=5)
    counts = builder.samples_per_concept(pairs)
    return [counts[c.name] for c in builder.concepts]


def test_stage1_pairs_follow_the_balance_and_repeats(unequal, tmp_path):
    """Global pairs (a photo each) take each concept's share; a Region pair weighs what its photo weighs, so the
    concepts' photo counts are balanced and their regions per photo are kept."""
    concepts = load_concept_set(unequal)
    spec = RegionSpec()
    images = PairBuilder(concepts, size=48, segmenter=None, regions=spec, balance="images")
    balanced = PairBuilder(concepts, size=48, segmenter=None, regions=spec, balance="concepts")
    g = pair_share(images, "global")
    assert 5 / 7 - 0.06 < g[0] / 400 < 5 / 7 + 0.06  # per photo: 5 of every 7
    g = pair_share(balanced, "global")
    assert abs(g[0] - g[1]) < 60  # half each
    pieces = [len(p) for p in balanced.parts]
    r = pair_share(images, "region")
    assert abs(r[0] / 400 - pieces[0] / sum(pieces)) < 0.06  # per region, as before the flag
    r = pair_share(balanced, "region")
    per_photo = [pieces[0] / 5, pieces[1] / 2]  # both concepts' photos weigh the same
    assert abs(r[0] / 400 - per_photo[0] / sum(per_photo)) < 0.06
    weighted = load_concept_set(with_repeats(unequal, tmp_path / "r", [1, 3]))
    g = pair_share(PairBuilder(weighted, size=48, segmenter=None, balance="concepts"), "global")
    assert 0.75 - 0.06 < g[1] / 400 < 0.75 + 0.06  # repeats 3 against 1
    g = pair_share(PairBuilder(weighted, size=48, segmenter=None, balance="images"), "global")
    assert 6 / 11 - 0.06 < g[1] / 400 < 6 / 11 + 0.06  # 2 photos x 3 against 5 x 1


def test_stage1_uniform_draw_where_the_weights_are_equal(unequal, tmp_path):
    """Equal photo counts and repeats keep the one uniform draw the builder always made, for Global and Region
    pairs alike (regions per photo differ between concepts, as in the toy world): the same pairs as before the
    flag, under either balance."""
    assert PairBuilder(load_concept_set(unequal), size=32, segmenter=None, balance="images").piece_weights(
        "global")[1] is None
    equal = load_concept_set(write_concept_set(tmp_path / "eq", n_concepts=2, n_images=3, size=96, seed=1))
    spec = RegionSpec(segments=30, min_area=0.02, per_image=20)
    a = PairBuilder(equal, size=32, segmenter=None, regions=spec, balance="concepts")
    b = PairBuilder(equal, size=32, segmenter=None, regions=spec, balance="images")
    assert len({len(p) for p in a.parts}) > 1  # unequal region counts
    assert a.piece_weights("global")[1] is None and a.piece_weights("region")[1] is None
    ratios = {"global": 0.4, "region": 0.3, "mix": 0.3}
    pa, pb = a.build(30, ratios, seed=2), b.build(30, ratios, seed=2)
    assert [(p.caption, p.sources) for p in pa] == [(p.caption, p.sources) for p in pb]


def test_pair_preview_takes_the_flag_and_prints_pairs_per_concept(unequal, tmp_path, capsys):
    shown = {}
    for balance in ("concepts", "images"):
        augment.main(["--train_data_dir", str(unequal), "--out", str(tmp_path / balance), "--num_pairs", "60",
                      "--ratios", "1,0,0", "--size", "32", "--holdout_images", "0", "--concept_balance", balance])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        shown[balance] = dict(x.split() for x in line.split("pairs per concept: ")[1].split(", "))
    assert sum(map(int, shown["concepts"].values())) == sum(map(int, shown["images"].values())) == 60
    assert abs(int(shown["concepts"]["redball"]) - 30) < 10 and int(shown["images"]["redball"]) > 36


def test_stage1_flag_reaches_the_pair_builder(unequal):
    parser = train_clif.build_parser()
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", str(unequal), "--output_dir", "o"]
    concepts = load_concept_set(unequal)
    for extra, want in (([], "concepts"), (["--concept_balance", "images"], "images")):
        args = parser.parse_args(base + extra)
        assert builder_from_args(args, concepts, size=32, segmenter=None, regions=False).balance == want


# ---- resume


def manifest_with(tmp_path: Path, concepts, args: dict) -> Path:
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    entries = [c.describe() for c in concepts]
    atomic_write_json(ckpt / MANIFEST, {"stage": "ti", "family": "sd", "base_model": "m", "base_fingerprint": "f",
                                        "concepts": entries, "args": args})
    return ckpt


def test_resume_refuses_other_repeats_and_a_pre_flag_checkpoint_as_images(unequal, tmp_path):
    concepts = load_concept_set(unequal)
    args = {"concept_balance": "concepts", "seed": 0}
    ckpt = manifest_with(tmp_path, concepts, args)
    check_resumable(ckpt, concepts, args, "", harmless=cli.HARMLESS, before=cli.BEFORE_FLAG)
    concepts[1].repeats = 2
    with pytest.raises(UserError, match="'bluebox' was trained with repeats 1, this run has 2"):
        check_resumable(ckpt, concepts, args, "", harmless=cli.HARMLESS, before=cli.BEFORE_FLAG)
    # a checkpoint made before repeats and --concept_balance existed trained with repeats 1 and images balance
    old = tmp_path / "old"
    old.mkdir()
    ckpt = manifest_with(old, [], {"seed": 0})
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["concepts"] = [{k: v for k, v in c.describe().items() if k != "repeats"}
                            for c in load_concept_set(unequal)]
    atomic_write_json(ckpt / MANIFEST, manifest)
    concepts = load_concept_set(unequal)
    with pytest.raises(UserError, match="--concept_balance images, this run has concepts"):
        check_resumable(ckpt, concepts, args, "", harmless=cli.HARMLESS, before=cli.BEFORE_FLAG)
    check_resumable(ckpt, concepts, {**args, "concept_balance": "images"}, "", harmless=cli.HARMLESS,
                    before=cli.BEFORE_FLAG)


# ---- stages 2 and 3 end to end


def epochs(argv: list[str], n: str = "1") -> list[str]:
    """`argv` with --num_train_epochs n instead of --max_train_steps."""
    i = argv.index("--max_train_steps")
    return [*argv[:i], *argv[i + 2:], "--num_train_epochs", n]


def stats(out: Path) -> dict:
    return json.loads((out / "run_stats.json").read_text())


def test_stages_2_and_3_share_samples_by_concept_and_resume_bit_identical(tiny_sd15, unequal, tmp_path):
    """One epoch of stage 2 on 5 + 2 images: `concepts` gives each concept 5 samples (10, batch 2: 5 steps),
    `images` 5 and 2 (7, batch 7: 1 step); run_stats.json and the model card say so; a run resumed from its checkpoint
    equals the uninterrupted one; stage 3 records its counts too."""
    full = tmp_path / "full"
    train_ti.main(epochs(ti_args(tiny_sd15, unequal, full, "--checkpointing_steps", "2", "--random_flip")))
    got = stats(full)
    assert len(got["losses"]) == 5 and got["samples_per_concept"] == {"redball": 5, "bluebox": 5}
    card = (full / "README.md").read_text()
    assert "- `--concept_balance` concepts" in card
    assert "| redball | 5 | 1 | 5 |" in card and "| bluebox | 2 | 1 | 5 |" in card
    manifest = json.loads((full / MANIFEST).read_text())
    assert [c["repeats"] for c in manifest["concepts"]] == [1, 1]

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    train_ti.main(epochs(ti_args(tiny_sd15, unequal, part, "--checkpointing_steps", "2", "--random_flip",
                                 "--resume_from_checkpoint", "latest")))
    for name in ("redball", "bluebox"):
        a = load_file(str(full / "embeddings" / f"{name}.safetensors"))
        b = load_file(str(part / "embeddings" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert stats(part)["samples_per_concept"] == got["samples_per_concept"]
    assert stats(part)["losses"] == got["losses"][2:]

    images = tmp_path / "images"
    train_ti.main(epochs(ti_args(tiny_sd15, unequal, images, "--concept_balance", "images", "--train_batch_size",
                                 "7")))
    got = stats(images)
    assert len(got["losses"]) == 1 and got["samples_per_concept"] == {"redball": 5, "bluebox": 2}
    assert "| bluebox | 2 | 1 | 2 |" in (images / "README.md").read_text()

    s3 = tmp_path / "s3"
    train_lora.main(lora_args(tiny_sd15, unequal, full, s3, "--max_train_steps", "2"))
    assert sum(stats(s3)["samples_per_concept"].values()) == 4  # 2 steps of batch 2
    assert "## Samples per concept" in (s3 / "README.md").read_text()


def test_repeats_weight_stage_2(tiny_sd15, unequal, tmp_path):
    """repeats 3 on the small concept under `images`: 5 + 6 samples an epoch, as kohya's num_repeats."""
    data = with_repeats(unequal, tmp_path / "set", [1, 3])
    out = tmp_path / "out"
    train_ti.main(ti_args(tiny_sd15, data, out, "--concept_balance", "images", "--max_train_steps", "1",
                          "--train_batch_size", "11", "--learning_rate", "1e-9"))
    assert stats(out)["samples_per_concept"] == {"redball": 5, "bluebox": 6}
    assert "| bluebox | 2 | 3 | 6 |" in (out / "README.md").read_text()


def test_balance_flag_is_declared_once_for_every_stage():
    for script in (train_clif, train_ti, train_lora):
        actions = [a for a in script.build_parser()._actions if a.dest == "concept_balance"]
        assert len(actions) == 1 and actions[0].default == "concepts" and set(actions[0].choices) == {
            "concepts", "images"}
        assert "concept_balance" not in cli.HARMLESS


def test_stage1_run_stats_and_card_count_its_pairs_per_concept(tiny_sd15, unequal, tmp_path):
    """Stage 1 records the pairs that show each concept (its pair builder's own count, for the run's seed); Global
    pairs only: `concepts` shares them about evenly over 5 + 2 photos, `images` by photo (random draws: bounds)."""
    got = {}
    for balance in ("concepts", "images"):
        out = tmp_path / balance
        train_clif.main(["--pretrained_model_name_or_path", str(tiny_sd15), "--train_data_dir", str(unequal),
                         "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--report_to", "none",
                         "--num_pairs", "300", "--global_ratio", "1", "--region_ratio", "0", "--mix_ratio", "0",
                         "--holdout_images", "0", "--train_batch_size", "4", "--num_views", "2",
                         "--max_train_steps", "1", "--concept_balance", balance])
        got[balance] = stats(out)["pairs_per_concept"]
        card = (out / "README.md").read_text()
        assert "| concept | images | repeats | pairs |" in card
        assert f"| bluebox | 2 | 1 | {got[balance]['bluebox']} |" in card
    # 300 draws: `images` expects 5/7 of them for redball (214, sd 8), `concepts` half (150, sd 9)
    assert sum(got["concepts"].values()) == sum(got["images"].values()) == 300
    assert abs(got["concepts"]["redball"] - 150) < 35 and got["images"]["redball"] > 185
