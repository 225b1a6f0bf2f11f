"""The toy-world experiment: a ladder of look-alike pairs, from clearly different to near twins. For each rung and
seed: (c) TI alone, (a) TI+LoRA (stages 2+3), (b) CLIF (stages 1+2+3), with the same steps, seeds and prompts.
Each generates single-concept and two-concept prompts; the referee (trained on VAE round trips, it knows the
world's ground truth) reads every image, and `evaluate.py` scores the same folders with the world's own CLIP.
Before any method is compared, the base passes (or fails) the renderability gate (`gate.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from clif import cli
from clif.eval.agreement import agreement, folder_rows

from .gate import referee_and_gate
from .ladder import add_rungs_file_arg, prompt_set, select_rungs, write_concept_set
from .methods import LABELS, LADDER, METHODS, chain_dirs, generation_options, stage_argv
from .probe import fresh_views, leak_figure, stage_rows, words_row
from .referee import Referee
from .report import CURRENT_RULE, aggregate, decision, ladder_figure, side_by_side, write_ladder_table
from .scoring import read_generated, score_images

REPO = Path(__file__).resolve().parents[2]
IN_PROCESS = threading.Lock()


def run_cmd(argv: list[str], log: Path) -> float:
    """Run one script (its output to `log`); raises with the log's tail when it fails; returns seconds."""
    t = time.time()
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[2]} failed (exit {r.returncode}); see {log}:\n" + log.read_text()[-2000:])
    return time.time() - t


def run_method(
    method: str, base: Path, data: Path, work: Path, seed: int, steps: dict, cache: dict, common: str
) -> list[Path]:
    """Train `method`'s stages (reusing identical earlier stages across methods); returns its stage dirs."""
    prev, dirs = None, []
    for stage, out in chain_dirs(method, work):
        if out not in cache:
            if not (out / "clif_manifest.json").exists():
                if out.exists():  # a stage this experiment started but did not finish: start it again
                    import shutil

                    shutil.rmtree(out)
                cache.setdefault("_times", {})[out.name] = run_cmd(
                    stage_argv(stage, base, data, out, prev, seed, steps, common), work / "log.txt"
                )
            cache[out] = out
        prev = out
        dirs.append(out)
    return dirs


def generate(
    base: Path, stage: Path, out: Path, prompts_list: list[str], n: int, steps: int, log: Path, flags=()
) -> Path:
    """inference.py on `stage` (with a method's generation `flags`) into `out`, unless it finished there."""
    prompts = out.with_suffix(".prompts.txt")
    prompts.write_text("\n".join(prompts_list) + "\n")
    if not (out / "contact_sheet.png").exists():
        run_cmd(
            [
                sys.executable,
                "-m",
                "inference",
                "--pretrained_model_name_or_path",
                str(base),
                "--stage_dir",
                str(stage),
                "--prompt_set",
                str(prompts),
                "--output_dir",
                str(out),
                "--overwrite",
                "--num_images_per_prompt",
                str(n),
                "--num_inference_steps",
                str(steps),
                "--batch_size",
                "16",
                "--guidance_scale",
                "4.0",
                *flags,
            ],
            log,
        )
    return out


def evaluate_folder(clip: Path, data: Path, folder: Path, out: Path, log: Path) -> dict:
    """evaluate.py with the world's own CLIP, `clip` = the world's paired_clip/ (image halves for the left/right
    prompts: no detector here); a folder already scored (its metrics.json) is read, not scored again."""
    if not (out / "metrics.json").exists():
        run_cmd(
            [
                sys.executable,
                "-m",
                "evaluate",
                "--images",
                str(folder),
                "--concepts",
                str(data),
                "--output_dir",
                str(out),
                "--overwrite",
                "--clip_model",
                str(clip),
                "--detector",
                "none",
            ],
            log,
        )
    summary = json.loads((out / "metrics.json").read_text())
    first = next(iter(summary.values())) if isinstance(summary, dict) else summary
    return first.get("summary", first) if isinstance(first, dict) else {}


def stage1_diagnostics(stage1: Path) -> dict:
    f = stage1 / "confusion.json"
    if not f.exists():
        return {}
    conf = json.loads(f.read_text())
    # the held-out photos' matrix when the concepts have enough photos, else the (labelled) train-photo one
    return next((conf[k] for k in ("held_out", "train_views") if (conf.get(k) or {}).get("views")), conf)


def one_run(
    rung: str,
    concepts: dict,
    seed: int,
    methods: list[str],
    args,
    base: Path,
    work: Path,
    steps: dict,
    referee: Referee,
) -> dict:
    """Every method for one rung and seed: per-method scores, stage-1 diagnostics, stage times, image folders."""
    data = work / rung / "concepts"
    out = work / rung / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    log, cache, rows, folders, agree, stage1, text_rows = out / "log.txt", {}, {}, {}, {}, {}, {}
    common = ",".join(sorted({c.cls for c in concepts.values()}))
    views = fresh_views(concepts, steps["size"], seed)
    with IN_PROCESS:
        words = words_row(base, concepts)
    for m in methods:
        if args.aggregate_only and not (out / f"images-{m}" / "contact_sheet.png").is_file():
            continue  # not run (yet) for this (rung, seed): left out of the rung's table
        dirs = run_method(m, base, data, out, seed, steps, cache, common)
        folder = generate(
            base,
            dirs[-1],
            out / f"images-{m}",
            prompt_set(concepts),
            args.images_per_prompt,
            args.inference_steps,
            log,
            METHODS[m].generate,
        )
        ev = evaluate_folder(base / "paired_clip", data, folder, out / f"eval-{m}", log)
        # in this process, one (rung, seed) at a time: model loading is not thread-safe (transformers switches
        # torch's default dtype and builds modules on the meta device while it loads)
        with IN_PROCESS:
            imgs, prompts, files = read_generated(folder)
            scores = score_images(referee.read(imgs), prompts, concepts)
            for row, f in zip(scores["rows"], files):
                row["image"] = f
            (folder / "referee.json").write_text(json.dumps(scores, indent=2) + "\n")
            # is evaluate.py's confusion right? its per-image decisions (and D&C on halves) against the referee's
            agree[m] = folder_rows(
                folder, folder / "referee.json", out / f"eval-{m}" / "metrics.json", data, str(base / "paired_clip")
            )
            rows[m] = {k: v for k, v in scores.items() if k != "rows"}
            rows[m].update({f"clip_{k}": v for k, v in ev.items() if isinstance(v, (int, float))})
            # the text side after each stage: leak of the first concept into the second, retrieval on fresh renders
            # (with isolated encoding, what the spliced states leak); shared by the methods of one chain
            iso = generation_options(m)
            key = (tuple(dirs), (iso.isolate, iso.isolate_weight, iso.isolate_end))
            if key not in text_rows:
                text_rows[key] = stage_rows(base, list(zip(METHODS[m].stages, dirs)), concepts, views, iso)
            rows[m].update(text_rows[key])
        folders[m] = folder
        if METHODS[m].stages[0].script == "clif":
            stage1[m] = stage1_diagnostics(dirs[0])
    times = cache.get("_times", {})
    return {
        "rows": rows,
        "stage1": stage1,
        "times": times,
        "folders": folders,
        "agree": agree,
        "words": words,
    }


def attention_figure(base: Path, out: Path, concepts: dict, methods: list[str], args, path: Path) -> None:
    """One two-concept image per method (the same seed and prompt: the leak order, <a> left, <b> right) with each
    concept's cross-attention map (inference.py --save_attention_maps), rows = methods."""
    from PIL import Image
    from safetensors.torch import load_file

    from clif.compose.maps import maps_grid

    a, b = (f"<{n}>" for n in concepts)
    rows = []
    for m in methods:
        folder = generate(
            base,
            chain_dirs(m, out)[-1][1],
            out / f"maps-{m}",
            ["a photo of a {0} on the left and a {1} on the right"],  # a template: <a> left, <b> right
            1,
            args.inference_steps,
            out / "log.txt",
            (*METHODS[m].generate, "--save_attention_maps"),
        )
        stem = min(folder.glob("*.attention.safetensors")).name.removesuffix(".attention.safetensors")
        image = Image.open(folder / f"{stem}.png").convert("RGB")
        rows.append((LABELS.get(m, m), image, load_file(folder / f"{stem}.attention.safetensors")["maps"], [a, b]))
    maps_grid(rows, path)


def qualifies(table: dict) -> bool:
    """The comparison means something only where TI+LoRA draws each concept alone and still confuses the pair."""
    t = table.get("ti_lora")
    return bool(t) and t["fidelity"][0] >= 0.7 and t["oracle_confusion"][0] >= 0.3


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    base, work = Path(args.base), Path(args.out)
    RUNGS = select_rungs(args.rungs_file, args.rungs, "--rungs")
    work.mkdir(parents=True, exist_ok=True)
    size = json.loads((base / "toyworld.json").read_text())["size"]
    steps = {"size": size, "clif": args.clif_steps, "ti": args.ti_steps, "lora": args.lora_steps}
    referee, gate = referee_and_gate(
        base,
        Path(args.referee) if args.referee else work / "referee",
        work / "gate",
        size,
        n=args.gate_captions,
        referee_kw={"n_train": args.referee_scenes, "steps": args.referee_steps},
    )
    for rung, concepts in RUNGS.items():
        if not (work / rung / "concepts" / "concepts.json").exists():
            write_concept_set(work / rung / "concepts", concepts, size)
    from concurrent.futures import ThreadPoolExecutor

    def runs(rungs: list[str], methods: list[str]) -> dict:
        todo = [(r, s) for s in args.seeds for r in rungs]  # seed-major: a cut-short run has every rung alike
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # stages are subprocesses: side by side
            return dict(zip(todo, pool.map(lambda rs: one_run(rs[0], RUNGS[rs[0]], rs[1], methods, *common), todo)))

    common = (args, base, work, steps, referee)
    # phase 1: the baseline on every rung decides which rungs qualify; phase 2: every method where it matters
    first = [m for m in ("ti_lora",) if m in args.methods and args.variants_on == "qualifying"]
    done = runs(list(RUNGS), first) if first else {}
    pick = [
        r
        for r in RUNGS
        if not first or qualifies(aggregate({"ti_lora": [done[(r, s)]["rows"]["ti_lora"] for s in args.seeds]}))
    ]
    done.update(runs(pick, args.methods))
    rungs = {}
    for r, concepts in RUNGS.items():
        # a method is in a rung's table when every seed has it (--aggregate_only may find some unfinished)
        methods = [
            m for m in (args.methods if r in pick else first) if all(m in done[(r, s)]["rows"] for s in args.seeds)
        ]
        per_seed = {m: [done[(r, s)]["rows"][m] for s in args.seeds] for m in methods}
        table = aggregate(per_seed)
        rungs[r] = {
            "concepts": {n: o.phrase() for n, o in concepts.items()},
            "qualifies": qualifies(table),
            "table": table,
            "per_seed": per_seed,
            "stage1": {f"seed{s}": done[(r, s)]["stage1"] for s in args.seeds if done[(r, s)]["stage1"]},
            "words": aggregate({"words": [done[(r, s)]["words"] for s in args.seeds]})["words"],
        }
        side_by_side(done[(r, args.seeds[0])]["folders"], work / f"side_by_side_{r}.png", per_prompt=4)
        if rungs[r]["qualifies"]:
            attention_figure(
                base, work / r / f"seed{args.seeds[0]}", concepts, methods, args, work / f"attention_{r}.png"
            )
    pooled = [row for d in done.values() for rows_ in d["agree"].values() for row in rows_]
    result = {
        "metric_vs_referee": agreement(pooled),
        "seeds": args.seeds,
        "steps": steps,
        "images_per_prompt": args.images_per_prompt,
        "gate": gate,
        "referee": referee.meta,
        "rungs": rungs,
        "times_s": {f"{r}/seed{s}/{k}": v for (r, s), d in done.items() for k, v in d["times"].items()},
    }
    result["rule"] = CURRENT_RULE
    result["decision"] = decision(result)
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_ladder_table(result, work / "results.md"))
    ladder_figure(result, work / "ladder.png")
    leak_figure(result, work / "leak.png")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="The pretrained world (python -m clif.toyworld pretrain --out).")
    p.add_argument("--out", required=True, help="Work folder: concept sets, stage dirs, images, results.md/json.")
    p.add_argument(
        "--referee",
        default=None,
        help="Referee folder (loaded if there, else trained on the base VAE's round trips; default OUT/referee).",
    )
    add_rungs_file_arg(p)
    p.add_argument("--rungs", nargs="+", default=None, help="Rungs of --rungs_file to run (default: all of them).")
    p.add_argument("--seeds", type=cli.seed_type(), nargs="+", default=[0, 1, 2], help="Training/generation seeds.")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(LADDER),
        help="Methods (clif/toyworld/methods.py): ti = stage 2 only; ti_lora = stages 2+3; clif = stages 1+2+3 "
        "(token rows); clif_te / clif_full: stage 1 also trains a text-encoder LoRA / the whole encoder; "
        "clif_frozen: stage 1, then stage 3 with the rows frozen; ti_lora_by_images: ti_lora sampling uniformly over "
        "images (--concept_balance images; not in the default ladder).",
    )
    p.add_argument("--clif_steps", type=cli.count(10**6), default=300, help="Stage-1 steps.")
    p.add_argument("--ti_steps", type=cli.count(10**6), default=400, help="Stage-2 steps.")
    p.add_argument("--lora_steps", type=cli.count(10**6), default=300, help="Stage-3 steps.")
    p.add_argument(
        "--images_per_prompt", type=cli.count(1000), default=6, help="Images per prompt (4 single, 4 two-concept)."
    )
    p.add_argument("--inference_steps", type=cli.count(1000), default=30, help="Denoising steps.")
    p.add_argument(
        "--gate_captions", type=cli.count(10**5), default=200, help="World captions the renderability gate samples."
    )
    p.add_argument(
        "--referee_scenes", type=cli.count(10**6), default=16000, help="Rendered scenes the referee trains on."
    )
    p.add_argument("--referee_steps", type=cli.count(10**6), default=2500, help="Training steps of the referee.")
    p.add_argument(
        "--threads",
        type=cli.count(1024),
        default=None,
        help="CPU threads of each stage (sets OMP_NUM_THREADS; 1 is fastest on a shared machine).",
    )
    p.add_argument(
        "--variants_on",
        choices=["qualifying", "all"],
        default="qualifying",
        help="Rungs every method runs on: 'qualifying' (TI+LoRA runs first on every rung; the rest only where it "
        "qualifies) or 'all'.",
    )
    p.add_argument(
        "--aggregate_only",
        action="store_true",
        help="Train and generate nothing: score what earlier runs finished (a method missing for a seed is left out "
        "of that rung's table).",
    )
    p.add_argument(
        "--jobs", type=cli.count(256), default=1, help="(rung, seed) runs side by side (one core each is best)."
    )
