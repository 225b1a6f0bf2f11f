"""The toy world: generator determinism, masks and captions; pretraining at tiny size feeds every stage; the
experiment pipeline end to end at minimal steps; the committed world (when present) and its oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clif.toyworld.world import Obj, Scene, random_scene, render, render_batch

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "toyworld" / "model"


def test_generator_is_deterministic_and_seed_dependent():
    a_img, a_cap = render_batch(3, 8)
    b_img, b_cap = render_batch(3, 8)
    c_img, c_cap = render_batch(4, 8)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap


def test_masks_match_objects_and_captions_name_what_is_drawn():
    scene = Scene((Obj("ball", "red", slot="left"), Obj("box", "blue", "stripes", "white", slot="right")),
                  background=(200, 200, 200))
    img, masks = render(scene, 32)
    a = np.asarray(img).astype(int)
    left, right = (np.asarray(m) > 0 for m in masks)
    assert left[:, :16].sum() > 0.95 * left.sum() and right[:, 16:].sum() > 0.95 * right.sum()
    # pixels under the left mask are red, under the right mask blue or white (stripes), outside: background
    core = np.asarray(masks[0].resize((32, 32))) > 0
    assert np.abs(a[core].mean(0) - (220, 40, 40)).max() < 30
    rmean = a[right].mean(0)
    assert rmean[2] > rmean[0] + 40  # blue dominates over red
    assert np.abs(a[~(left | right)].mean(0) - 200).max() < 10
    assert scene.caption() == "a red ball on the left and a blue box with white stripes on the right"


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
