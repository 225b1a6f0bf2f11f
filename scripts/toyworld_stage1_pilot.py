"""Pilot of the stage-1 variants' learning rate, before the comparison: stage 1 alone (clif_te: text-encoder LoRA;
clif_full: whole encoder) at several rates on one rung and a seed the comparison does not use, read by the leak
probe and retrieval on fresh renders (no image generation: minutes on one core).

    python scripts/toyworld_stage1_pilot.py --base pretrained/toyworld/model --out outputs/pilot \
        --json pretrained/toyworld/stage1_pilot.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clif.toyworld.experiment import run_cmd
from clif.toyworld.ladder import load_rungs, write_concept_set
from clif.toyworld.methods import CLIF, Stage, stage_argv
from clif.toyworld.probe import fresh_views, stage_rows, words_row

# variant -> (--train_text_encoder, rates tried)
GRID = {
    "clif": (None, [None]),
    "clif_te": ("lora", ["1e-4", "1e-3", "1e-2"]),
    "clif_full": ("full", ["1e-5", "1e-4", "1e-3"]),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True, help="Where the pilot's numbers go.")
    p.add_argument("--rung", default="distinct")
    p.add_argument("--seed", type=int, default=100, help="Not one of the comparison's seeds.")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--variants", nargs="+", choices=list(GRID), default=list(GRID), help="Which rows of the grid.")
    args = p.parse_args(argv)
    base, work = Path(args.base), Path(args.out) / args.rung
    concepts = load_rungs()[args.rung]
    size = json.loads((base / "toyworld.json").read_text())["size"]
    data = work / "concepts"
    if not (data / "concepts.json").exists():
        write_concept_set(data, concepts, size)
    views = fresh_views(concepts, size, args.seed)
    common = ",".join(sorted({c.cls for c in concepts.values()}))
    result = {"rung": args.rung, "seed": args.seed, "steps": args.steps, "words": words_row(base, concepts), "runs": {}}
    for variant, (kind, rates) in ((v, GRID[v]) for v in args.variants):
        for rate in rates:
            flags = ("--train_text_encoder", kind, "--text_encoder_lr", rate) if kind else ()
            stage = Stage(f"{variant}_{rate}" if rate else variant, "clif", flags) if kind else CLIF
            out = work / f"seed{args.seed}" / stage.tag
            out.parent.mkdir(parents=True, exist_ok=True)
            if not (out / "clif_manifest.json").exists():
                run_cmd(
                    stage_argv(stage, base, data, out, None, args.seed, {"clif": args.steps}, common),
                    out.parent / "log.txt",
                )
            result["runs"][stage.tag] = stage_rows(base, [(stage, out)], concepts, views)
            print(stage.tag, result["runs"][stage.tag], flush=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
