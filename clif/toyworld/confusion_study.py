"""Is evaluate.py's confusion decision right? Per image, against the toy world's referee, rung by rung.

For every folder of generated toy-world images that has the referee's reading (`<root>/<rung>/seed*/images-<method>/
referee.json`), evaluate.py scores the folder with the world's CLIP (halves, no detector) into `--work`, and
`clif.eval.agreement.folder_rows` joins its rows with the referee's (plus D&C on halves, MuDI's definition). Then:

1. **diagnosis** of the fixed-margin rule (`confused_margin`): referee kind x decision, per rung; the correct images it
   calls confused, and why; the distribution of the margin it compares with 0.02;
2. **tuning** of clif/eval/kinds.py's margins on the `--tune` rungs only (a grid; pooled Cohen's kappa);
3. **held-out** report on the `--held_out` rungs with those settings: agreement, kappa, rate, referee kind x our kind;
   `--seen` rungs are reported apart: held out for an earlier version, then read while designing this one.

    python scripts/confusion_metric_study.py --roots outputs/evidence outputs/metric22 \
        --json pretrained/toyworld/confusion_metric_study.json        # = python -m clif.toyworld confusion-study

`--readme` rewrites the generated block (between the two markers below) of docs/evaluation.md from the JSON;
`--from_json` does only that, from a committed JSON, without images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import numpy as np

from clif.eval import kinds
from clif.eval.agreement import agreement, cohen_kappa, folder_rows, kind_matrix
from clif.eval.metrics import says_left_right

from .confusion_tables import markdown
from .experiment import evaluate_folder
from .report import replace_block
from .scoring import KINDS as REFEREE_KINDS

TUNE = ("distinct", "lookalike", "twin")
# held out for v1 (the evidence rungs, scripts/confusion_study_rungs.json) and v2 (confusion_study_rungs2.json), read
# before the current version was made
SEEN = ("star_box", "box_ball", "ball_star", "ball_ball", "box_star", "star_ball", "ball_box", "box_box")
HELD_OUT = ("star_box3", "box_ball3", "ball_star3")  # scripts/confusion_study_rungs3.json: made after v3 was fixed
GRID = {
    "margin": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "common_margin": (-0.5, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3),
    "mixture_margin": (-0.2, -0.1, 0.0, 0.1, 0.2, 0.3),
    "class_margin": (0.0, 0.1, 0.2, 0.3, 0.5, 99.0),  # 99: the class words never decide (v1: the commons do)
}
# the earlier versions, as clif/eval/kinds.py's current code reproduces them (v1: class words never read; v2: no
# class_mix), compared on the same images in the report
VERSIONS = {
    "v1": kinds.Settings(margin=0.0, common_margin=0.1, mixture_margin=-0.2, class_margin=1e9),
    "v2": kinds.Settings(margin=0.0, common_margin=-0.3, mixture_margin=-0.2, class_margin=0.5, class_mix=False),
}
BEGIN = "<!-- confusion-metric-study:begin (generated: python scripts/confusion_metric_study.py --from_json) -->"
END = "<!-- confusion-metric-study:end -->"


def folders(roots: list[Path], rungs: tuple[str, ...]) -> list[tuple[str, Path, Path]]:
    """(rung, image folder, concept set) for every referee-read folder of `rungs` under `roots`."""
    out = []
    for root in roots:
        for rung in rungs:
            for ref in sorted((root / rung).glob("seed*/images-*/referee.json")):
                out.append((rung, ref.parent, root / rung / "concepts"))
    return out


def collect(rung: str, folder: Path, concepts: Path, clip: str, work: Path) -> list[dict]:
    """evaluate.py on one folder (into `work`), joined with the referee's rows; each row keeps what kinds.decide
    needs to decide again under other settings."""
    out = work / folder.parent.parent.parent.name / rung / folder.parent.name / folder.name
    out.parent.mkdir(parents=True, exist_ok=True)
    evaluate_folder(Path(clip).resolve(), concepts.resolve(), folder.resolve(), out.resolve(), out.parent / "eval.log")
    ev = {r["file"]: r for r in next(iter(json.loads((out / "metrics.json").read_text()).values()))["rows"]}
    classes = {c["name"]: c["class"] for c in json.loads((concepts / "concepts.json").read_text())["concepts"]}
    rows = folder_rows(folder, folder / "referee.json", out / "metrics.json", concepts, clip)
    for r in rows:
        e = ev[r["image"]]
        r.update(
            rung=rung,
            folder=str(folder),
            kind_sims=e["kind_sims"],
            kind_common=e["kind_common"],
            kind_class=e.get("kind_class"),
            kind_class_gap=e.get("kind_class_gap"),
            kind_gap=e["kind_gap"],
            positional=says_left_right(e["prompt"]),
            same_class=classes[e["concepts"][0]] == classes[e["concepts"][1]],
            min_gap=min(abs(a - b) for a, b in e["confusion_sims"]) if e["confusion_sims"] else None,
            margin_reason=_reason(e["confusion_sims"]),
        )
    return rows


def _reason(sims) -> str | None:
    """Why the margin rule calls an image confused: 'same best' (both instances nearest one concept) or 'gap'."""
    if not sims:
        return None
    best = [int(np.argmax(s)) for s in sims]
    if best[0] == best[1]:
        return "same best"
    return "gap < margin" if min(abs(a - b) for a, b in sims) < 0.02 else None


RUNG_FILES = (
    "clif/toyworld/rungs.json",
    "scripts/confusion_study_rungs.json",
    "scripts/confusion_study_rungs2.json",
    "scripts/confusion_study_rungs3.json",
)


def _parse(phrase: str):
    """'a red box with a blue top' -> the world's Obj (the referee's own wording, clif/toyworld/world.py)."""
    from clif.toyworld.world import Obj

    w = phrase.split()
    return Obj(w[2], w[1], w[6], w[5]) if len(w) == 7 else Obj(w[2], w[1])


def solid_only_mixtures(rung: str, rows: list[dict]) -> int | None:
    """How many of the referee's mixtures are mixtures only because a solid body counts as something the solid
    concept has and the marked one lacks (scoring.features lists ("mark", "solid")): a marked concept drawn without
    its mark, beside a solid one, is a 'mixture'. A toy-world diagnostic of the referee, not part of the metric."""
    from clif.toyworld import scoring
    from clif.toyworld.ladder import load_rungs

    concepts = next((load_rungs(f)[rung] for f in RUNG_FILES if rung in load_rungs(f)), None)
    if concepts is None:
        return None
    a, b = (scoring.features(c) - {("mark", "solid")} for c in concepts.values())
    count = 0
    for r in rows:
        if r["oracle_kind"] != "mixture":
            continue
        read = json.loads((Path(r["folder"]) / "referee.json").read_text())
        slots = [s.split(": ", 1)[1] for o in read["rows"] if o["image"] == r["image"] for s in o["read"]]
        objs = [_parse(s) for s in slots]
        names = [scoring.name_of(o, concepts) for o in objs]
        still = [
            o
            for o, n in zip(objs, names)
            if n == "mix" and (f := scoring.features(o) - {("mark", "solid")}) & (a - b) and f & (b - a)
        ]
        count += not still
    return count


def redecide(rows: list[dict], settings: kinds.Settings) -> list[dict]:
    """Rows with `kind` and `clip` (confused) from kinds.decide under `settings` (the stored similarities)."""
    out = []
    for r in rows:
        if r["kind_sims"] is None:
            out.append({**r, "kind": None, "clip": None})
            continue
        d = kinds.decide(
            r["kind_sims"],
            r["kind_common"],
            r["kind_gap"],
            r["positional"],
            r["same_class"],
            settings,
            r["kind_class"],
            r["kind_class_gap"],
        )
        out.append({**r, "kind": d["kind"], "clip": d["confused"]})
    return out


def _kappa(rows: list[dict], field: str = "clip") -> float | None:
    pairs = [(r["oracle"], r[field]) for r in rows if r.get(field) is not None]
    return cohen_kappa(*zip(*pairs)) if pairs else None


def tune(rows: list[dict]) -> tuple[kinds.Settings, list[dict]]:
    """The grid's setting with the highest pooled kappa on `rows` (ties: the higher mean per-rung kappa, then the
    earlier grid point = the smaller margins); the grid table, best first."""
    rungs = sorted({r["rung"] for r in rows})
    table = []
    for values in itertools.product(*GRID.values()):
        s = kinds.Settings(*values)
        got = redecide(rows, s)
        per = {g: _kappa([r for r in got if r["rung"] == g]) for g in rungs}
        pooled = _kappa(got)
        mean = statistics.mean(v if v is not None else 0.0 for v in per.values())
        table.append({"settings": s.as_dict(), "kappa": pooled, "mean_rung_kappa": mean, "per_rung": per})
    order = sorted(range(len(table)), key=lambda i: (-(table[i]["kappa"] or -9), -table[i]["mean_rung_kappa"], i))
    table = [table[i] for i in order]
    return kinds.Settings(**table[0]["settings"]), table


def quantiles(xs: list[float]) -> dict | None:
    if not xs:
        return None
    q = np.quantile(xs, [0, 0.25, 0.5, 0.75, 1])
    return {
        "n": len(xs),
        "min": q[0],
        "q25": q[1],
        "median": q[2],
        "q75": q[3],
        "max": q[4],
        "below_0.02": float(np.mean(np.asarray(xs) < 0.02)),
    }


def rung_report(rows: list[dict]) -> dict:
    """One rung (or a pool): counts, the margin rule's diagnosis, the kinds decision, D&C, as agreement() does."""
    table = agreement(rows)
    flagged = [r for r in rows if r["oracle_kind"] == "correct" and r.get("clip_margin")]
    return {
        "images": len(rows),
        "folders": sorted({r["folder"] for r in rows}),
        "referee_kinds": {k: sum(r["oracle_kind"] == k for r in rows) for k in REFEREE_KINDS},
        "referee_solid_only_mixtures": (
            solid_only_mixtures(rows[0]["rung"], rows) if len({r["rung"] for r in rows}) == 1 else None
        ),
        "kinds": table["clip_confusion"],
        "margin_rule": table.get("clip_confusion_margin"),
        "dc_halves": table["dc"],
        "referee_confusion": table["oracle_confusion"],
        "matrix_kinds": kind_matrix(rows, "kind"),
        "matrix_margin_rule": kind_matrix(rows, "clip_margin"),
        "margin_rule_flags_correct": {
            "count": len(flagged),
            "why": {w: sum(r["margin_reason"] == w for r in flagged) for w in ("same best", "gap < margin")},
        },
        "margin_distribution": {
            k: quantiles([r["min_gap"] for r in rows if r["oracle_kind"] == k and r["min_gap"] is not None])
            for k in REFEREE_KINDS
            if any(r["oracle_kind"] == k for r in rows)
        },
        "loo_gap": quantiles([g for r in rows for g in r["kind_gap"] or [] if g is not None]),
    }


def versions(rows: list[dict]) -> dict:
    """Agreement of every earlier version (and the margin rule) on `rows`, as agreement() reports a decision."""
    out = {"margin rule": agreement(rows).get("clip_confusion_margin")}
    for name, s in VERSIONS.items():
        out[name] = agreement(redecide(rows, s))["clip_confusion"]
    return out


def report(rows: list[dict], settings: kinds.Settings, grid: list[dict], tune_rungs, held_rungs, seen=()) -> dict:
    got = redecide(rows, settings)
    order = list(tune_rungs) + list(seen) + list(held_rungs)
    by = {g: [r for r in got if r["rung"] == g] for g in order}
    raw = {g: [r for r in rows if r["rung"] == g] for g in order}
    sets = {"tuning": tune_rungs, "seen": seen, "held_out": held_rungs}
    return {
        "settings": settings.as_dict(),
        "settings_in_code": kinds.SETTINGS.as_dict(),
        "tune_rungs": list(tune_rungs),
        "held_out_rungs": list(held_rungs),
        "seen_rungs": list(seen),
        "grid_top": grid[:10],
        "grid_points": len(grid),
        "pooled": {
            "tuning": rung_report([r for g in tune_rungs for r in by[g]]),
            "seen": rung_report([r for g in seen for r in by[g]]) if any(by[g] for g in seen) else None,
            "held_out": rung_report([r for g in held_rungs for r in by[g]]) if any(by[g] for g in held_rungs) else None,
        },
        "rungs": {g: rung_report(rs) for g, rs in by.items() if rs},
        "versions": {
            **{g: versions(rs) for g, rs in raw.items() if rs},
            **{f"all {k}": versions([r for g in v for r in raw[g]]) for k, v in sets.items() if any(raw[g] for g in v)},
        },
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--roots", nargs="+", default=["outputs/evidence", "outputs/metric22", "outputs/metric22b", "outputs/metric22c"]
    )
    p.add_argument("--tune", nargs="+", default=list(TUNE), help="Rungs the settings are chosen on.")
    p.add_argument("--held_out", nargs="*", default=list(HELD_OUT), help="Rungs only reported.")
    p.add_argument("--seen", nargs="*", default=list(SEEN), help="Rungs reported apart (read before the settings).")
    p.add_argument("--clip_model", default="pretrained/toyworld/model/paired_clip")
    p.add_argument("--work", default="outputs/metric22/eval", help="Where evaluate.py writes (never into --roots).")
    p.add_argument("--json", required=True, help="The study's numbers (written, or read with --from_json).")
    p.add_argument(
        "--readme", default="docs/evaluation.md", help="Rewrite this document's generated block from the JSON."
    )
    p.add_argument(
        "--settings_from",
        default=None,
        help="A tuning run's JSON (this script with --held_out and nothing after it): use its settings, tune nothing.",
    )
    p.add_argument("--previous", nargs="*", default=[], help="Earlier versions' study JSONs, summarised beside.")
    p.add_argument("--from_json", action="store_true", help="Only the document's block, from an existing --json.")


def run(args: argparse.Namespace) -> dict:
    if args.from_json:
        result = json.loads(Path(args.json).read_text())
    else:
        rows = []
        for rung, folder, concepts in folders(
            [Path(r) for r in args.roots], tuple(args.tune + args.seen + args.held_out)
        ):
            rows += collect(rung, folder, concepts, args.clip_model, Path(args.work))
        if args.settings_from:  # the settings of an earlier tuning run, fixed before the held-out rungs were read
            tuned = json.loads(Path(args.settings_from).read_text())
            settings, grid = kinds.Settings(**tuned["settings"]), tuned["grid_top"]
        else:
            settings, grid = tune([r for r in rows if r["rung"] in args.tune])
        result = report(rows, settings, grid, args.tune, args.held_out, args.seen)
        result["previous"] = []
        for path in args.previous:
            prev = json.loads(Path(path).read_text())
            held = prev["pooled"]["held_out"]
            result["previous"].append(
                {
                    "json": path,
                    "settings": prev["settings"],
                    "kappa": held["kinds"]["kappa"],
                    "images": held["images"],
                    "rungs": {
                        g: {"kappa": prev["rungs"][g]["kinds"]["kappa"], "images": prev["rungs"][g]["images"]}
                        for g in prev["held_out_rungs"]
                        if g in prev["rungs"]
                    },
                }
            )
        if args.settings_from:
            result["tuning_run"] = {
                "json": args.settings_from,
                "grid_points": tuned["grid_points"],
                "images": tuned["pooled"]["tuning"]["images"],
                "folders": tuned["pooled"]["tuning"]["folders"],
                "kappa": tuned["pooled"]["tuning"]["kinds"]["kappa"],
            }
            result["grid_points"] = tuned["grid_points"]
        Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
    if args.readme:
        replace_block(Path(args.readme), BEGIN, END, markdown(result, args.json))
    print(markdown(result, args.json))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="scripts/confusion_metric_study.py", description=__doc__.split("\n\n")[0])
    add_args(p)
    return run(p.parse_args(argv))
