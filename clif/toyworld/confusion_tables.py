"""The confusion-metric study's tables (clif/toyworld/confusion_study.py): the markdown block that
docs/evaluation.md carries between its generated-block markers, from the study's JSON alone."""

from __future__ import annotations

from clif.eval import kinds

from .scoring import KINDS as REFEREE_KINDS


def _f(x, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _tuned_line(run: dict) -> str:
    return (
        f"Tuned on {run['images']} images (`{run['json']}` lists them; pooled kappa there {_f(run['kappa'])}); "
        "tuning-rung images made later are reported below, not tuned on."
    )


def _solid(r: dict) -> str:
    n = r.get("referee_solid_only_mixtures")
    return "" if n is None else f"{n} of {r['referee_kinds']['mixture']}"


def _previous_line(prev: dict) -> str:
    per = ", ".join(f"{g} {_f(v['kappa'])} ({v['images']})" for g, v in prev["rungs"].items())
    return (
        f"An earlier version (`{prev['json']}`, settings {prev['settings']}) on what were then its held-out rungs: "
        f"pooled kappa **{_f(prev['kappa'])}** over {prev['images']} images ({per}). Its failures there shaped the "
        "next version, so those rungs are only *seen* rungs now."
    )


def markdown(result: dict, source: str) -> str:
    """The study block of docs/evaluation.md: per rung (tuning, then held-out) the two decisions' agreement with
    the referee, D&C beside, the kinds matrix, the margin rule's diagnosis."""
    s = result["settings"]
    lines = [
        f"_Generated from `{source}` by `scripts/confusion_metric_study.py`._",
        "",
        (
            f"Settings chosen on the tuning rungs ({', '.join(result['tune_rungs'])}; {result['grid_points']} grid "
            f"points, pooled kappa): {', '.join(f'{k} {v}' for k, v in s.items())} (the class margin in units of the "
            "references' class-word gap, the others of their leave-one-out gap). Held-out rungs: "
            f"{', '.join(result['held_out_rungs'])}; seen rungs (held out for the earlier version, read before this "
            f"one was made): {', '.join(result.get('seen_rungs', []))}."
        ),
        "",
        *(
            [
                _tuned_line(result["tuning_run"]),
                "",
            ]
            if "tuning_run" in result
            else []
        ),
        *[x for prev in result.get("previous", []) for x in (_previous_line(prev), "")],
        (
            "| rung | set | images | referee confusion | kinds: agreement | **kinds: kappa** | kinds: rate | "
            "margin rule: agreement | margin rule: kappa | margin rule: rate | D&C halves: kappa | referee "
            "mixtures only by 'solid' |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(name, part, r):
        k, m, d = r["kinds"], r["margin_rule"] or {}, r["dc_halves"]
        return (
            f"| {name} | {part} | {r['images']} | {_f(r['referee_confusion'])} | {_f(k.get('agreement'))} | "
            f"**{_f(k.get('kappa'))}** | {_f(k.get('rate'))} | {_f(m.get('agreement'))} | {_f(m.get('kappa'))} | "
            f"{_f(m.get('rate'))} | {_f(d.get('kappa'))} | {_solid(r)} |"
        )

    parts = (
        ("tuning", "tune_rungs", "tuning"),
        ("seen", "seen_rungs", "seen"),
        ("held-out", "held_out_rungs", "held_out"),
    )
    for part, key, pool in parts:
        rungs = result.get(key, [])
        for g in rungs:
            if g in result["rungs"]:
                lines.append(row(g, part, result["rungs"][g]))
        pooled = result["pooled"].get(pool)
        if pooled:
            lines.append(row(f"**all {part}**", part, pooled))
    if "versions" in result:
        names = [*next(iter(result["versions"].values())), "current"]  # the margin rule, then the earlier versions
        lines += [
            "",
            "Cohen's kappa of each version of the decision on the same images (the current one is the table above):",
            "",
            "| rung | images | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for g, v in result["versions"].items():
            cur = result["rungs"][g] if g in result["rungs"] else result["pooled"][g[4:].replace("-", "_")]
            cells = [_f((v.get(n) or {}).get("kappa")) for n in names[:-1]] + [_f(cur["kinds"].get("kappa"))]
            lines.append(f"| {g} | {cur['images']} | " + " | ".join(cells) + " |")
    ours = kinds.KINDS
    for part in ("tuning", "seen", "held_out"):
        pooled = result["pooled"].get(part)
        if not pooled:
            continue
        lines += [
            "",
            (
                f"Referee kind (rows) x decision (columns), {part.replace('_', '-')} rungs pooled ({pooled['images']} "
                "images): the kinds decision's kind, then the margin rule's confused / not confused."
            ),
            "",
            "| referee \\ ours | " + " | ".join(ours) + " | margin rule: confused | not confused |",
            "|---" * (len(ours) + 3) + "|",
        ]
        for k in REFEREE_KINDS:
            mk, mm = pooled["matrix_kinds"].get(k, {}), pooled["matrix_margin_rule"].get(k, {})
            if not mk and not mm:
                continue
            cells = [str(mk.get(o, 0)) for o in ours] + [str(mm.get("confused", 0)), str(mm.get("not confused", 0))]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    t = result["pooled"]["tuning"]
    lines += [
        "",
        (
            "The margin rule's margin (per image, the smaller |s_A - s_B| of its two instances) by referee kind, "
            "tuning rungs; the references' leave-one-out gap for scale:"
        ),
        "",
        "| referee kind | images | min | median | max | share < 0.02 |",
        "|---|---|---|---|---|---|",
    ]
    for k, q in t["margin_distribution"].items():
        lines.append(
            f"| {k} | {q['n']} | {_f(q['min'], 3)} | {_f(q['median'], 3)} | {_f(q['max'], 3)} | {_f(q['below_0.02'])} |"
        )
    g = t["loo_gap"]
    lines.append(
        f"| (references' LOO gap) | {g['n']} | {_f(g['min'], 3)} | {_f(g['median'], 3)} | {_f(g['max'], 3)} | |"
    )
    flags = t["margin_rule_flags_correct"]
    lines += [
        "",
        (
            f"Correct images (tuning rungs) the margin rule calls confused: {flags['count']} "
            f"({flags['why']['same best']} with both instances nearest one concept, {flags['why']['gap < margin']} "
            "with a gap below 0.02)."
        ),
    ]
    return "\n".join(lines)
