"""Figures and tables of the toy world: pretraining sample grids and loss curves, the experiment's table and
its side-by-side figure (matplotlib, readable labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .methods import LABELS

SAMPLE_CAPTIONS = (
    "a red ball on the left and a blue box on the right",
    "a blue box on the left and a red ball on the right",
    "a yellow ball with a purple band on the left and a yellow ball with a black spot on the right",
    "a yellow ball with a purple spot",
    "a green star with a black top",
    "a purple box with a yellow band on the right",
    "a black star on the left",
    "a blue ball with a red top on the left and a green star on the right",
)


def sample_grid(pipe, path: Path, captions=SAMPLE_CAPTIONS, seeds=(0, 1, 2), steps: int = 30, guidance: float = 4.0):
    """A matplotlib grid: one row per caption, one column per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(captions), len(seeds), figsize=(1.6 * len(seeds) + 4.2, 1.6 * len(captions)), squeeze=False
    )
    for r, cap in enumerate(captions):
        for c, s in enumerate(seeds):
            img = pipe(
                cap,
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="pil",
                generator=torch.Generator().manual_seed(s),
            ).images[0]
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel("\n".join(_wrap(cap, 34)), rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(f"seed {s}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def plot_losses(logs: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3), squeeze=False)
    for ax, (name, log) in zip(axes[0], logs.items()):
        k = max(1, len(log) // 100)
        sm = np.convolve(log, np.ones(k) / k, mode="valid") if len(log) >= k else log
        ax.plot(sm)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def side_by_side(folders: dict[str, Path], path: Path, per_prompt: int = 4, rows: int = 2) -> None:
    """Same prompts, same seeds: one column block per method (matplotlib, prompts as row labels); the first
    `rows` two-concept prompts of the first method's folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(folders)
    metas = {m: [(p, json.loads(p.read_text())) for p in sorted(f.glob("*.json"))] for m, f in folders.items()}
    prompts = list(dict.fromkeys(d["prompt"] for _, d in metas[methods[0]] if " and " in d.get("prompt", "")))
    prompts = prompts[:rows]
    fig, axes = plt.subplots(
        len(prompts),
        len(methods) * per_prompt,
        figsize=(1.1 * len(methods) * per_prompt + 2.2, 1.4 * len(prompts) + 0.6),
        squeeze=False,
    )
    for r, prompt in enumerate(prompts):
        for mi, m in enumerate(methods):
            files = [p for p, d in metas[m] if d.get("prompt") == prompt]
            for k in range(per_prompt):
                ax = axes[r][mi * per_prompt + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(files):
                    ax.imshow(Image.open(files[k].with_suffix(".png")), interpolation="nearest")
                if r == 0 and k == 0:
                    ax.set_title(LABELS.get(m, m), fontsize=9, loc="left")
                if mi == 0 and k == 0:
                    ax.set_ylabel(
                        prompt.replace(" on the ", "\non the "), rotation=0, ha="right", va="center", fontsize=7
                    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aggregate(per_seed: dict) -> dict:
    """mean ± std over seeds of every numeric metric, per method."""
    table = {}
    for method, runs in per_seed.items():
        keys = sorted(
            {k for r in runs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        table[method] = {
            k: (float(np.mean([r[k] for r in runs if k in r])), float(np.std([r[k] for r in runs if k in r])))
            for k in keys
        }
    return table


KIND_COLS = ("pair_missing", "pair_swapped", "pair_same", "pair_mixture", "pair_other", "pair_correct")


def _num(x) -> str:
    return "–" if x is None else (str(x) if isinstance(x, int) else f"{x:.3f}")


def _pm(vals: dict, key: str) -> str:
    return f"{vals[key][0]:.2f} ± {vals[key][1]:.2f}" if key in vals else "–"


DECISION_RULE = (
    "A variant works when, on at least two qualifying rungs, its mean confusion is at most half of TI+LoRA's with "
    "fidelity no more than 0.05 below TI+LoRA's."
)


def decision(result: dict) -> dict[str, dict]:
    """Per CLIF variant: on which qualifying rungs it passes the rule, and whether it works."""
    out = {}
    rungs = {r: v["table"] for r, v in result["rungs"].items() if v["qualifies"]}
    variants = sorted({m for t in rungs.values() for m in t if m.startswith("clif")})
    for m in variants:
        passed = []
        for r, t in rungs.items():
            if m in t and "ti_lora" in t:
                base, v = t["ti_lora"], t[m]
                if v["oracle_confusion"][0] <= 0.5 * base["oracle_confusion"][0] and (
                    v["fidelity"][0] >= base["fidelity"][0] - 0.05
                ):
                    passed.append(r)
        works = len(passed) >= 2
        text = ("**works**" if works else "does not work") + f": passes on {len(passed)} of {len(rungs)} qualifying"
        out[m] = {"works": works, "passed": passed, "text": text + f" rungs ({', '.join(passed) or 'none'})"}
    return out


def text_side_table(result: dict) -> list[str]:
    """The leak probe (fwd: the later concept after the earlier, the order the confusion is seen in; rev: the
    other order) and retrieval on fresh renders, after each stage, mean ± std over seeds; words = the base's
    leak on the concepts' plain words."""
    cols = [f"leak{n}_fwd" for n in (1, 2, 3)] + ["leak3_rev"] + [f"retrieval{n}" for n in (1, 2, 3)]
    head = ["leak fwd after 1", "after 2", "after 3", "leak rev after 3", "retrieval after 1", "after 2", "after 3"]
    lines = [
        "## Text side after each stage (leak probe, retrieval on fresh renders)",
        "",
        "| rung | method | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(head),
    ]
    for rung, r in result["rungs"].items():
        w = r.get("words", {})
        lines.append(
            f"| {rung} | plain words (base) | – | – | {_pm(w, 'leak_fwd')} | {_pm(w, 'leak_rev')} | – | – | – |"
        )
        for m, vals in r["table"].items():
            lines.append(f"| {rung} | {LABELS.get(m, m)} | " + " | ".join(_pm(vals, c) for c in cols) + " |")
    return lines


def write_ladder_table(result: dict, path: Path | None) -> str:
    """results.md: the gate, then per rung and method fidelity, confusion and its kinds, the CLIP metrics."""
    from .gate import gate_table

    lines = ["## Renderability gate (base samples read by the referee)", "", gate_table(result["gate"]), ""]
    acc = result["referee"].get("heldout_round_trip_accuracy", {})
    if acc:
        lines.append(
            "Referee on 2,000 held-out VAE round trips: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + "\n"
        )
    lines += [
        f"## Ladder (seeds {result['seeds']}, mean ± std over seeds; {result['images_per_prompt']} images per prompt)",
        "",
        "| rung | method | fidelity | **confusion** | missing | swapped | same | mixture | other | correct | "
        + "CLIP text | CLIP image | CLIP confusion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rung, r in result["rungs"].items():
        for m, vals in r["table"].items():
            cells = [_pm(vals, "fidelity"), f"**{_pm(vals, 'oracle_confusion')}**"]
            cells += [_pm(vals, k) for k in KIND_COLS]
            cells += [_pm(vals, f"clip_{k}") for k in ("text_alignment", "image_alignment", "confusion_rate")]
            lines.append(f"| {rung} | {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines.append("")
    for rung, r in result["rungs"].items():
        pair = " vs ".join(f"<{n}> = {p}" for n, p in r["concepts"].items())
        verdict = "qualifies" if r["qualifies"] else "does not qualify"
        lines.append(f"- **{rung}** ({pair}): {verdict} (TI+LoRA fidelity >= 0.7 and confusion >= 0.3 needed)")
        for seed, per_method in r["stage1"].items():
            done = {m: d for m, d in per_method.items() if "before" in d and "after" in d}
            if done:
                lines.append(
                    f"  - stage-1 held-out retrieval, world CLIP, {seed}: "
                    + "; ".join(
                        f"{m} {d['before']['accuracy']:.2f} -> {d['after']['accuracy']:.2f}" for m, d in done.items()
                    )
                )
    lines += ["", *text_side_table(result)]
    verdicts = decision(result)
    lines += ["", "## Decision (fixed before the runs)", "", DECISION_RULE, ""]
    lines += [f"- {LABELS.get(m, m)}: " + v["text"] for m, v in verdicts.items()]
    agree = result.get("metric_vs_referee")
    if agree:
        lines += [
            "",
            (
                f"## Our confusion metrics against the referee's ground truth ({agree['images']} two-concept images, "
                f"referee confusion {_num(agree['oracle_confusion'])})"
            ),
            "",
            "| metric | images | agreement | Cohen's kappa | Spearman (score vs confused) | rate |",
            "|---|---|---|---|---|---|",
        ]
        for name, label in (
            ("clip_confusion", "evaluate.py CLIP confusion (halves)"),
            ("dc", "D&C on halves, world CLIP"),
        ):
            e = agree.get(name, {})
            cells = [e.get("images"), e.get("agreement"), e.get("kappa"), e.get("spearman"), e.get("rate")]
            lines.append(f"| {label} | " + " | ".join(_num(c) for c in cells) + " |")
    times = result.get("times_s", {})
    if times:
        lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(times.items()))]
    text = "\n".join(lines) + "\n"
    if path is not None:
        path.write_text(text)
    return text


def ladder_figure(result: dict, path: Path) -> None:
    """Confusion and fidelity vs rung for each method, mean ± std over seeds as error bars (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = list(result["rungs"])
    methods = list(dict.fromkeys(m for r in result["rungs"].values() for m in r["table"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(rungs))
    width = 0.8 / max(1, len(methods))
    for ax, key, title in (
        (axes[0], "oracle_confusion", "two-concept confusion (referee)"),
        (axes[1], "fidelity", "single-concept fidelity (referee)"),
    ):
        for i, m in enumerate(methods):
            vals = [result["rungs"][r]["table"].get(m, {}).get(key, (np.nan, 0.0)) for r in rungs]
            mean, std = [v[0] for v in vals], [v[1] for v in vals]
            ax.bar(
                x + (i - (len(methods) - 1) / 2) * width,
                mean,
                width,
                yerr=std,
                capsize=3,
                label=LABELS.get(m, m),
            )
        ax.set_xticks(x)
        ax.set_xticklabels(rungs)
        ax.set_xlabel("rung (clearly different -> near twins)")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction of images")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Toy-world ladder, seeds {result['seeds']} (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BEGIN, END = (
    "<!-- toyworld-results:begin (generated: python -m clif.toyworld readme) -->",
    "<!-- toyworld-results:end -->",
)
HEADLINE_BEGIN, HEADLINE_END = (
    "<!-- toyworld-headline:begin (generated: python -m clif.toyworld readme) -->",
    "<!-- toyworld-headline:end -->",
)


def headline(result: dict) -> str:
    """The README's short form: confusion / fidelity (means over seeds) of every method on the qualifying rungs,
    the lowest confusion of each rung in bold, then the decision."""
    rungs = {g: r["table"] for g, r in result["rungs"].items() if r["qualifies"]}
    methods = list(dict.fromkeys(m for t in rungs.values() for m in t))
    best = {g: min(v["oracle_confusion"][0] for v in t.values()) for g, t in rungs.items()}
    lines = [
        (
            f"Confusion / fidelity on the rungs where TI+LoRA confuses, mean of {len(result['seeds'])} seeds (lower "
            "confusion is better; the lowest of each rung in bold):"
        ),
        "",
        "| method | " + " | ".join(rungs) + " |",
        "|---" * (len(rungs) + 1) + "|",
    ]
    for m in methods:
        cells = []
        for g, t in rungs.items():
            if m not in t:
                cells.append("–")
                continue
            c = f"{t[m]['oracle_confusion'][0]:.2f}"
            cells.append(f"{f'**{c}**' if t[m]['oracle_confusion'][0] == best[g] else c} / {t[m]['fidelity'][0]:.2f}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", DECISION_RULE, ""]
    lines += [f"- {LABELS.get(m, m)}: " + v["text"] for m, v in decision(result).items()]
    return "\n".join(lines)


def replace_block(doc_path: Path, begin: str, end: str, body: str) -> None:
    """Replace what stands between the markers `begin` and `end` of a generated block in `doc_path` with `body`
    (a blank line either side); SystemExit when the markers are missing."""
    doc = doc_path.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{doc_path}: no generated block ({begin} ... {end}) to replace")
    head, rest = doc.split(begin, 1)
    doc_path.write_text(f"{head}{begin}\n\n{body}\n\n{end}{rest.split(end, 1)[1]}")


def update_readme(results: Path, readme: Path, headline_doc: Path | None = None) -> str:
    """Replace the generated block (between BEGIN and END) of `readme` (docs/toyworld.md) with the tables of a
    committed results JSON, its headings one level down, and, given `headline_doc` (the README), its headline block
    (between HEADLINE_BEGIN and HEADLINE_END); returns the first block."""
    result = json.loads(results.read_text())
    text = write_ladder_table(result, None)
    block = "\n".join(f"#{line}" if line.startswith("## ") else line for line in text.splitlines())
    block = f"_Generated from `{results.as_posix()}`._\n\n{block}"
    replace_block(readme, BEGIN, END, block)
    if headline_doc is not None:
        replace_block(headline_doc, HEADLINE_BEGIN, HEADLINE_END, headline(result))
    return block
