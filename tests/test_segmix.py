"""Seg-Mix in stage 3 (train_lora.py --segmix_prob, clif/train/segmix.py): collages, their masks and captions, the
masked loss, determinism from --seed, a tiny run, resume, and the refusal of a changed resume."""

from __future__ import annotations

import argparse
import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import built_once, lora_args, run_cli, ti_args
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import train_lora
import train_ti
from clif import seeds
from clif.concepts import Concept, load_concept_set
from clif.train import training
from clif.train.data import ConceptImages, Sample
from clif.train.segmix import CollagePool, SegMix, caption, latent_mask, paste_pair

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def disc(colour, w=20, h=14) -> Image.Image:
    """A cut-out as augment.cut_out makes it: RGBA, alpha = a disc; the pixels outside it are green (never pasted)."""
    im = Image.new("RGBA", (w, h), (*GREEN, 0))
    ImageDraw.Draw(im).ellipse((0, 0, w - 1, h - 1), fill=(*colour, 255))
    return im


def where(canvas: np.ndarray, colour) -> np.ndarray:
    return (canvas == np.array(colour)).all(-1)


@pytest.mark.parametrize("mirror", [False, True])
def test_collage_pastes_the_masked_pixels_on_their_sides(mirror):
    size = 64
    for seed in range(40):
        canvas, mask, _ = paste_pair(disc(RED), disc(BLUE, 12, 24), size, random.Random(seed), mirror)
        red, blue = where(canvas, RED), where(canvas, BLUE)
        assert canvas.shape == (size, size, 3) and mask.shape == (size, size) and mask.dtype == bool
        assert not where(canvas, GREEN).any()  # only the masked pixels of a cut-out are pasted
        assert np.array_equal(mask, red | blue)  # the mask is exactly the pasted pixels
        assert where(canvas[~mask], (255, 255, 255)).all()  # white elsewhere
        cols = np.arange(size)[None, :].repeat(size, 0)
        assert cols[red].mean() < size / 2 < cols[blue].mean(), seed  # left subject left, right subject right
        assert red.sum() > 20 and blue.sum() > 20


def test_collage_scale_and_place_follow_mudi():
    """Each subject is scaled to [0.75, 1] of the largest size fitting its half less a 1/32 margin, lies 1 px to a
    quarter of the side from its edge, inside the canvas; over seeds the draws cover those ranges."""
    size, scales, gaps = 128, [], []
    for seed in range(200):
        _, _, boxes = paste_pair(disc(RED, 40, 20), disc(BLUE, 10, 40), size, random.Random(seed))
        (lx, ly, lw, lh), (rx, ry, rw, rh) = boxes
        fits = (min(60 / 40, 124 / 20) * 40, min(60 / 10, 124 / 40) * 10)  # widths at scale 1 (margin 128 / 32)
        for (x, y, w, h), fit in zip(boxes, fits):
            assert 0 <= y and y + h <= size and 0 <= x and x + w <= size
            scales.append(w / fit)
            assert 0.75 * fit - 1 <= w <= fit
        gaps += [lx, size - rx - rw]
        assert lx + lw / 2 < size / 2 < rx + rw / 2
    assert min(gaps) == 1 and max(gaps) == size // 4
    assert min(scales) < 0.77 and max(scales) > 0.97


def concepts_of(*names: str, vectors: int = 2) -> list[Concept]:
    return [Concept(name=n, token=f"<{n}>", initializer="toy", class_word="toy", images=[], num_vectors=vectors)
            for n in names]


def test_caption_names_both_concepts_and_their_sides():
    a, b = concepts_of("ann", "bob")
    assert caption(a, b, [a, b]) == "a photo of a <ann> <ann>_1 on the left and a <bob> <bob>_1 on the right"
    assert caption(b, a, [a, b]) == "a photo of a <bob> <bob>_1 on the left and a <ann> <ann>_1 on the right"


def test_pool_captions_match_the_placement():
    """Every collage of the pool: the concept its caption puts on the left is the one pasted on the left."""
    concepts = concepts_of("ann", "bob", "cyd")
    colours = [RED, BLUE, GREEN]
    cut = [[disc(c), disc(c, 10, 30)] for c in colours]  # two images per concept
    pool = CollagePool(cut, concepts, 64, 3, seed=5)
    assert len(pool) == 6 * 3 and pool.pixels.shape == (18, 3, 64, 64) and pool.masks.shape == (18, 1, 64, 64)
    cols = np.arange(64)[None, :].repeat(64, 0)
    seen = set()
    for i in range(len(pool)):
        left, right = pool.sides[i]
        own = i // 3 // 2  # its image's concept, with a partner, on the left in the even collages
        assert left != right and (left, right)[i % 2] == own
        canvas = np.asarray(pool.image(i))
        x_left, x_right = cols[where(canvas, colours[left])].mean(), cols[where(canvas, colours[right])].mean()
        assert x_left < 32 < x_right
        assert pool.captions[i] == caption(concepts[left], concepts[right], concepts)
        assert pool.captions[i].index(concepts[left].token) < pool.captions[i].index("on the left")
        seen.add((left, right))
    assert len(seen) >= 4  # partners and sides vary


def test_latent_mask_known_answer():
    """Bilinear to the latent grid (as MuDI): a left-half mask at 64 px is exactly the left half at 8."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1
    small = latent_mask(mask, (8, 8))
    assert small.shape == (1, 1, 8, 8)
    assert torch.equal(small[..., :4], torch.ones(1, 1, 8, 4)) and torch.equal(small[..., 4:], torch.zeros(1, 1, 8, 4))
    # bilinear without antialiasing, 64 -> 8: latent column i reads pixel columns 8i+3 and 8i+4, half each (an area
    # average would read all eight)
    cols = torch.zeros(1, 1, 64, 64)
    cols[..., [0, 3, 12, 19, 20]] = 1
    assert torch.equal(latent_mask(cols, (8, 8))[0, 0, 0], torch.tensor([0.5, 0.5, 1, 0, 0, 0, 0, 0]))


@pytest.fixture(scope="module")
def sd15_model(tiny_sd15):
    from clif.models import load_model

    return load_model(str(tiny_sd15))


def test_loss_counts_only_the_masked_latents(sd15_model):
    """The masked loss: changing the prediction where the latent mask is 0 leaves it unchanged, changing it inside
    does not; the value is mean(error x mask) over every element (MuDI); a mask of ones is the plain loss."""
    model = sd15_model
    assert model.prediction_type == "epsilon"
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :, :32] = 1  # left half of the first sample, none of the second
    base = Sample(pixels, torch.arange(2), torch.zeros(2, dtype=torch.bool), ["a photo of a toy"] * 2,
                  torch.zeros(2, 6))
    masked = Sample(**{**base.__dict__, "loss_mask": mask})

    def loss(sample, change=None):
        noise = training.NoiseSource(3, torch.device("cpu"), 2, 0, 2)

        def unet(x, t, hidden, **kw):
            pred = torch.zeros_like(x)
            if change is not None:
                pred = pred + change
            return argparse.Namespace(sample=pred)

        return training.diffusion_loss(model, base if sample is None else sample, None, noise, dtype=torch.float32,
                                       unet=unet)

    latent = model.vae.encode(pixels).latent_dist.mean.shape[-2:]
    weight = latent_mask(mask, latent)
    outside = torch.where(weight == 0, 5.0, 0.0).expand(2, 4, *latent)
    inside = torch.where(weight > 0, 5.0, 0.0).expand(2, 4, *latent)
    assert torch.equal(loss(masked), loss(masked, outside))
    assert not torch.allclose(loss(masked), loss(masked, inside))
    assert not torch.allclose(loss(None), loss(None, outside))  # unmasked, the same change counts
    ones = Sample(**{**base.__dict__, "loss_mask": torch.ones(2, 1, 64, 64)})
    assert torch.equal(loss(ones), loss(None))
    # known answer: prediction 0, so the squared error is eps^2, eps being the second draw of the noise stream
    noise = training.NoiseSource(3, torch.device("cpu"), 2, 0, 2)
    noise.randn(4, *latent)
    eps = noise.randn(4, *latent)
    expected = (eps**2 * weight).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss(masked), expected)


def stream(concept_set, prob=0.5, seed=0, per_image=4, background=0.0):
    concepts = load_concept_set(concept_set)
    data = ConceptImages(concepts, 32, False, seed=seeds.stream(seed, "data_order"))
    mix = SegMix(argparse.Namespace(segmix_prob=prob, segmix_collages=per_image, resolution=32, random_flip=False,
                                    seed=seed, learnable_property="object", segmenter="none", cache_dir="unused",
                                    segmix_background_weight=background))
    mix.check(concepts)
    return mix.wrap(data, None, concepts, None, "cpu")[0]


def same_sample(a: Sample, b: Sample) -> bool:
    return (torch.equal(a.pixels, b.pixels) and torch.equal(a.collage, b.collage) and a.captions == b.captions
            and torch.equal(a.loss_mask, b.loss_mask) and torch.equal(a.time_ids, b.time_ids))


def test_collages_follow_the_seed_and_are_random_access(concept_set):
    one, two = stream(concept_set), stream(concept_set)
    assert torch.equal(one.pool.pixels, two.pool.pixels) and one.pool.captions == two.pool.captions
    late = two.micro_batch(7, 4)  # read out of order: micro-batch k is a function of (seed, k) alone
    assert same_sample(one.micro_batch(0, 4), two.micro_batch(0, 4)) and same_sample(one.micro_batch(7, 4), late)
    halves = [one.micro_batch(5, 4, rank=r, local_batch=2) for r in (0, 1)]  # two processes share the batch
    whole = one.micro_batch(5, 4)
    assert torch.equal(torch.cat([h.collage for h in halves]), whole.collage)
    other = stream(concept_set, seed=1)
    assert not torch.equal(one.pool.pixels, other.pool.pixels)
    assert [one.micro_batch(k, 4).collage.tolist() for k in range(6)] != [
        other.micro_batch(k, 4).collage.tolist() for k in range(6)]


def test_a_share_p_of_the_samples_are_collages_of_their_own_image(concept_set):
    s = stream(concept_set, prob=0.3)
    n = 0
    for k in range(300):
        b = s.micro_batch(k, 4)
        hit = b.collage >= 0
        n += int(hit.sum())
        assert torch.equal(b.collage[hit] // s.pool.per_image, b.image_index[hit])  # a collage of the drawn image
        assert torch.equal(b.loss_mask[~hit], torch.ones_like(b.loss_mask[~hit]))
        for j in hit.nonzero().flatten().tolist():
            c = int(b.collage[j])
            assert torch.equal(b.pixels[j], s.pool.pixels[c]) and b.captions[j] == s.pool.captions[c]
            assert torch.equal(b.loss_mask[j], s.pool.masks[c].float())
    assert 0.25 < n / 1200 < 0.35
    stats = s.stats(1200)
    assert stats["collage_samples"] == n and sum(x["samples"] for x in stats["sides"]) == n
    assert {(x["left"], x["right"]) for x in stats["sides"]} == {("redball", "bluebox"), ("bluebox", "redball")}
    assert stream(concept_set, prob=1.0).stats(40)["collage_samples"] == 40


def test_background_weight_is_the_loss_weight_off_the_subjects(concept_set):
    """--segmix_background_weight a (MuDI's soft_alpha): a collage's pasted pixels weigh 1, the rest a."""
    for a in (0.0, 0.25, 1.0):
        b = stream(concept_set, prob=1.0, background=a).micro_batch(0, 4)
        for j, c in enumerate(b.collage.tolist()):
            mask = stream(concept_set).pool.masks[c]
            assert torch.equal(b.loss_mask[j][mask], torch.ones(int(mask.sum())))
            assert torch.equal(b.loss_mask[j][~mask], torch.full((int((~mask).sum()),), a))


def test_masks_come_from_the_segmenter_when_the_set_has_none(concept_set, tmp_path):
    from clif.fixtures.tiny import build_clipseg

    root = tmp_path / "set"
    shutil.copytree(concept_set, root)
    shutil.rmtree(root / "masks")
    concepts = load_concept_set(root)
    seg = build_clipseg(tmp_path / "clipseg")
    mix = SegMix(argparse.Namespace(segmix_prob=0.5, segmix_collages=1, resolution=32, random_flip=False, seed=0,
                                    learnable_property="object", segmenter=str(seg), cache_dir=str(tmp_path / "c"),
                                    segmix_background_weight=0.0))
    mix.check(concepts)
    assert [len(c) for c in mix.cut] == [3, 3] and len(list((tmp_path / "c" / "masks").glob("*.png"))) == 6


# ---- train_lora.py


@pytest.fixture(scope="module")
def ti_run(tiny_sd15, concept_set, tmp_path_factory):
    build = lambda out: train_ti.main(ti_args(tiny_sd15, concept_set, out / "sd15", "--max_train_steps", "2"))  # noqa: E731
    return built_once(tmp_path_factory, "segmix-ti", build) / "sd15"


def weights(out):
    return {f: load_file(str(out / f)) for f in ("pytorch_lora_weights.safetensors", "embeddings/redball.safetensors",
                                                 "embeddings/bluebox.safetensors")}


def equal(a, b) -> bool:
    return all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)


def test_a_tiny_run_with_segmix_trains_and_says_so(tiny_sd15, concept_set, ti_run, tmp_path):
    extra = ["--segmix_prob", "0.5", "--max_train_steps", "4", "--random_flip"]
    plain, mixed, cached = tmp_path / "plain", tmp_path / "mixed", tmp_path / "cached"
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_run, plain, "--max_train_steps", "4", "--random_flip"))
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_run, mixed, *extra))
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_run, cached, *extra, "--cache_latents"))
    stats = json.loads((mixed / "run_stats.json").read_text())
    assert all(np.isfinite(stats["losses"])) and "segmix" not in json.loads((plain / "run_stats.json").read_text())
    mix = stats["segmix"]
    assert mix["prob"] == 0.5 and mix["samples"] == 8 and 0 < mix["collage_samples"] < 8
    assert mix["pool"] == 6 * 8 and sum(x["samples"] for x in mix["sides"]) == mix["collage_samples"]
    card = (mixed / "README.md").read_text()
    assert "## Seg-Mix" in card and "--segmix_prob 0.5" in card and "| redball | bluebox |" in card
    assert "Seg-Mix" not in (plain / "README.md").read_text()
    manifest = json.loads((mixed / "clif_manifest.json").read_text())
    assert manifest["args"]["segmix_prob"] == 0.5
    a, b, c = weights(plain), weights(mixed), weights(cached)
    assert not equal(a, b)  # the collages changed the training
    for f in b:  # the cache only moves work: the collages' latents are the ones encoded on the fly
        for k in b[f]:
            torch.testing.assert_close(b[f][k], c[f][k], rtol=1e-4, atol=1e-5)


def test_segmix_resume_is_bit_identical_and_a_changed_one_refused(tiny_sd15, concept_set, ti_run, tmp_path, capsys):
    extra = ["--segmix_prob", "0.5", "--max_train_steps", "4", "--checkpointing_steps", "2", "--random_flip",
             "--cache_latents", "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_run, full, *extra))
    assert json.loads((full / "run_stats.json").read_text())["segmix"]["collage_samples"] > 0
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    for changed, flag in (("--segmix_prob", "0.3"), ("--segmix_collages", "4"), ("--segmix_background_weight", "1")):
        argv = lora_args(tiny_sd15, concept_set, ti_run, part, *extra, changed, flag, "--resume_from_checkpoint",
                         "latest")
        code, err = run_cli(train_lora.main, argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot resume from" in err and changed in err
    assert sorted(p.name for p in part.iterdir()) == ["checkpoint-2"]  # nothing written
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_run, part, *extra, "--resume_from_checkpoint", "latest"))
    assert equal(weights(full), weights(part))
    assert json.loads((part / "run_stats.json").read_text())["segmix"] == json.loads(
        (full / "run_stats.json").read_text())["segmix"]


def test_a_checkpoint_from_before_segmix_resumes_only_without_it(tiny_sd15, concept_set, ti_run, tmp_path, capsys):
    """A manifest without segmix_prob was made with Seg-Mix off: resuming it with Seg-Mix on is refused."""
    out = tmp_path / "old"
    extra = ["--max_train_steps", "2", "--checkpointing_steps", "1"]
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_run, out, *extra))
    shutil.rmtree(out / "checkpoint-2")
    manifest = out / "checkpoint-1" / "clif_manifest.json"
    m = json.loads(manifest.read_text())
    for k in ("segmix_prob", "segmix_collages", "segmix_background_weight", "segmenter", "cache_dir"):
        m["args"].pop(k)
    manifest.write_text(json.dumps(m))
    code, err = run_cli(train_lora.main, lora_args(tiny_sd15, concept_set, ti_run, out, *extra, "--segmix_prob", "0.5",
                                                  "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "--segmix_prob 0.0, this run has 0.5" in err
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_run, out, *extra, "--resume_from_checkpoint", "latest"))
