"""The text-side leak probe with known answers, and the toy world's rungs file (validation in one line)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from clif.eval.leak import find_span, leak, pair_leaks

WORDS = ["a", "photo", "of", "the", "on", "left", "and", "right", "<x>", "<y>", "red", "ball", "blue", "box"]
CONCEPTS = {"<x>", "<y>", "red", "ball", "blue", "box"}


def fake_encoder(copy: float):
    """Token states = a fixed random vector per word, except that the j-th word of a concept that follows another
    concept in the prompt becomes (1 - copy) * itself + copy * the first concept's j-th state: copy = 1 is a text
    encoder where the second concept provably copies the first, copy = 0 one with no context at all."""
    gen = torch.Generator().manual_seed(0)
    table = {w: torch.randn(16, generator=gen) for w in WORDS}

    def ids_of(text: str) -> list[int]:
        return [WORDS.index(w) for w in text.split()]

    def encode(prompts: list[str]):
        rows, ids = [], []
        for p in prompts:
            words = p.split()
            states, first, j = [], None, 0
            for w in words:
                h = table[w].clone()
                if w in CONCEPTS:
                    group = "x" if w in ("<x>", "red", "ball") else "y"
                    if first is None or first[0] == group:
                        first = (group, [*(first[1] if first else []), h])
                    else:
                        h, j = (1 - copy) * h + copy * first[1][j % len(first[1])], j + 1
                states.append(h)
            pad = 24 - len(states)
            rows.append(torch.stack(states + [torch.zeros(16)] * pad))
            ids.append(torch.tensor(ids_of(p) + [-1] * pad))
        return torch.stack(rows), torch.stack(ids)

    return encode, ids_of


@pytest.mark.parametrize("copy", [0.0, 0.5, 1.0])
def test_leak_known_answers(copy):
    encode, ids_of = fake_encoder(copy)
    # one-token concepts: the first-named's state exactly -> 1, untouched -> 0, half way -> 0.5
    assert leak(encode, ids_of, "<x>", "<y>")["leak"] == pytest.approx(copy, abs=1e-5)
    both = pair_leaks(encode, ids_of, {"x": "<x>", "y": "<y>"})
    assert set(both) == {"y<-x", "x<-y"} and all(v["leak"] == pytest.approx(copy, abs=1e-5) for v in both.values())


def test_leak_of_multi_token_words():
    """The second concept's span is found after the first's (they may share words); mean over its tokens."""
    encode, ids_of = fake_encoder(1.0)
    # 'red ball' then 'blue box': 'blue' copies 'red', 'box' copies 'ball'
    assert leak(encode, ids_of, "red ball", "blue box")["leak"] == pytest.approx(1.0, abs=1e-5)
    encode0, _ = fake_encoder(0.0)
    assert leak(encode0, ids_of, "red ball", "blue box")["leak"] == pytest.approx(0.0, abs=1e-5)
    assert find_span([5, 1, 2, 1, 2], [1, 2], start=2) == slice(3, 5)


def test_rungs_file_default_and_bad_inputs(tmp_path, capsys):
    from clif.toyworld.__main__ import main
    from clif.toyworld.ladder import load_rungs

    threads = torch.get_num_threads()
    rungs = load_rungs()
    assert {"distinct", "lookalike", "twin"} <= set(rungs) and len(rungs) >= 5
    differ = [r for r, c in rungs.items() if len({o.cls for o in c.values()}) > 1]
    assert len(differ) >= 3  # distinct + at least two new class-differing rungs
    good = {
        "a_a": {"class": "ball", "color": "red"},
        "b_b": {"class": "box", "color": "blue", "mark": "top", "mark_color": "yellow"},
    }
    cases = {
        "class": ({"a_a": {"class": "cat", "color": "red"}, "b_b": good["b_b"]}, "class 'cat' is not in the world"),
        "colour": ({"a_a": {"class": "ball", "color": "pink"}, "b_b": good["b_b"]}, "color 'pink'"),
        "mark": ({**good, "a_a": {"class": "ball", "color": "red", "mark": "dots"}}, "mark 'dots'"),
        "one concept": ({"a_a": good["a_a"]}, "two or more concepts"),
        "unknown field": ({**good, "a_a": {"class": "ball", "color": "red", "size": 3}}, "unknown field 'size'"),
        "same object": ({"a_a": good["a_a"], "b_b": good["a_a"]}, "the same object"),
        "images 0": ({**good, "a_a": {"class": "ball", "color": "red", "images": 0}}, "images must be an integer"),
        "images 2.5": ({**good, "a_a": {"class": "ball", "color": "red", "images": 2.5}}, "images must be an integer"),
    }
    for what, (rung, message) in cases.items():
        f = tmp_path / f"{what}.json"
        f.write_text(json.dumps({"rungs": {"r": rung}}))
        out = tmp_path / f"out-{what}"
        argv = ["experiment", "--base", str(tmp_path), "--out", str(out), "--rungs_file", str(f)]
        code, err = run_cli(main, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (what, err)
        assert not out.exists()  # refused before anything is written
    f = tmp_path / "good.json"
    f.write_text(json.dumps({"rungs": {"r": good}}))
    assert load_rungs(f)["r"]["b_b"].pattern_color == "yellow"
    # the command's one scoring thread is its own: this process gets its count back (else later in-process training
    # sums in another order than a subprocess does)
    assert torch.get_num_threads() == threads
    # per-concept training renders: what write_concept_set draws
    from clif.toyworld.ladder import write_concept_set

    f.write_text(json.dumps({"rungs": {"r": {**good, "a_a": {**good["a_a"], "images": 3}}}}))
    rung = load_rungs(f)["r"]
    assert rung.images == {"a_a": 3, "b_b": 5}
    root = write_concept_set(tmp_path / "set", rung, 32, n_common=1)
    assert [len(list((root / "images" / n).glob("*.png"))) for n in ("a_a", "b_b")] == [3, 5]
    code, err = run_cli(
        main,
        [
            "experiment",
            "--base",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--rungs_file",
            str(f),
            "--rungs",
            "nope",
        ],
        capsys,
    )
    assert code == 2 and "'nope' is not in" in err
