"""The text side of every stage dir of the experiment: the leak probe (clif/eval/leak.py) and stage-1 retrieval on
fresh renders of each concept, after each stage (1 = stage 1, 2 = stage 2, 3 = stage 3), as flat numbers a
method's row carries (so the ladder's mean ± std covers them), and the leak figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clif.eval.leak import TextProbe

from .ladder import render_concept
from .methods import LABELS
from .world import Obj

STAGE_NUMBER = {"clif": 1, "ti": 2, "lora": 3}


def directions(names: list[str]) -> dict[str, list[str]]:
    """fwd: a later concept after an earlier one ("<a> ... and <b>": the order the leak was seen in); rev: the
    other way. Keys as clif.eval.leak.pair_leaks writes them."""
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return {"fwd": [f"{b}<-{a}" for a, b in pairs], "rev": [f"{a}<-{b}" for a, b in pairs]}


def _summary(leaks: dict, names: list[str]) -> dict[str, float]:
    return {d: float(np.mean([leaks[k]["leak"] for k in keys])) for d, keys in directions(names).items()}


def fresh_views(concepts: dict[str, Obj], size: int, seed: int, n: int = 8) -> dict[str, list]:
    """n renders of each concept none of the stages saw (their own generator stream)."""
    rng = np.random.default_rng([seed, 97])
    return {name: [render_concept(o, rng, size)[0] for _ in range(n)] for name, o in concepts.items()}


def words_row(base: Path, concepts: dict[str, Obj]) -> dict[str, float]:
    """The reference: the leak on the concepts' plain words ("red ball"), which the base binds correctly."""
    names = list(concepts)
    texts = {n: o.phrase()[2:] for n, o in concepts.items()}  # without the leading "a "
    leaks = TextProbe(str(base)).leaks(texts)
    return {f"leak_{d}": v for d, v in _summary(leaks, names).items()}


def stage_rows(base: Path, chain: list[tuple], concepts: dict[str, Obj], views: dict, isolate=None) -> dict[str, float]:
    """leak{n}_fwd / leak{n}_rev / retrieval{n} after each stage n of one method's chain [(Stage, dir), ...]; with
    `isolate` (generation options), the leak of the spliced states the method generates from."""
    names, out = list(concepts), {}
    tokens = {c: f"<{c}>" for c in names}
    for stage, folder in chain:
        n = STAGE_NUMBER[stage.script]
        probe = TextProbe(str(base), str(folder), isolate)
        leaks = probe.leaks(tokens)
        out[f"retrieval{n}"] = probe.retrieval(str(base / "paired_clip"), views, tokens)
        for d, v in _summary(leaks, names).items():
            out[f"leak{n}_{d}"] = v
    return out


def leak_figure(result: dict, path: Path) -> None:
    """Per rung: the leak (fwd, the order the confusion is seen in) after stages 1, 2, 3 for each method, mean ±
    std over seeds, with the plain words' leak as the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = list(result["rungs"])
    fig, axes = plt.subplots(1, len(rungs), figsize=(4.2 * len(rungs), 3.6), squeeze=False)
    for ax, rung in zip(axes[0], rungs):
        r = result["rungs"][rung]
        for m, vals in r["table"].items():
            xs = [n for n in (1, 2, 3) if f"leak{n}_fwd" in vals]
            if xs:
                ys = [vals[f"leak{n}_fwd"] for n in xs]
                ax.errorbar(xs, [y[0] for y in ys], yerr=[y[1] for y in ys], marker="o", capsize=3, label=LABELS[m])
        w = r.get("words", {}).get("leak_fwd")
        if w is not None:
            ax.axhline(w[0], color="k", linestyle="--", label="plain words (base)")
        ax.set_xticks([1, 2, 3], ["after stage 1", "after stage 2", "after stage 3"])
        ax.set_ylabel("leak of the 1st concept into the 2nd")
        ax.set_title(f"{rung}: {' then '.join(r['concepts'].values())}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
