"""The toy-world experiment: does CLIF lower the confusion of two look-alike concepts?

Two custom concepts share class and body colour (two yellow balls) and differ only in pattern. For each seed:
(c) TI alone, (a) TI+LoRA (stages 2+3), (b) CLIF (stages 1+2+3), with the same steps, seeds and prompts. Each
generates the two-concept prompt set; `evaluate.py` scores it with the world's own CLIP, and an oracle classifier
(trained on rendered crops, only possible in a toy world) labels each half of every image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .oracle import OTHER, Oracle, train_oracle
from .report import aggregate, side_by_side, write_table
from .world import Obj, Scene, random_background, render

REPO = Path(__file__).resolve().parents[2]
# look-alikes: same class and body colour, identity in the pattern only
LOOKALIKES = {
    "ball_a": Obj("ball", "yellow", "dots", "purple"),
    "ball_b": Obj("ball", "yellow", "stripes", "purple"),
}
PAIR_PROMPTS = (
    "a photo of a {0} on the left and a {1} on the right",
    "a {0} on the left and a {1} on the right",
    "a photo of a {1} on the left and a {0} on the right",
    "a {1} on the left and a {0} on the right",
)
METHODS = {  # label -> the stages it runs
    "ti": ("ti",),
    "ti_lora": ("ti", "lora"),
    "clif": ("clif", "ti", "lora"),
}


def render_concept(obj: Obj, rng: np.random.Generator, size: int, slot: str = "center"):
    """One render of a concept on a fresh background: image and mask."""
    from dataclasses import replace

    o = replace(obj, slot=slot, dy=float(rng.uniform(-0.08, 0.08)))
    img, masks = render(Scene((o,), random_background(rng), int(rng.integers(2**31))), size)
    return img, masks[0]


def write_concept_set(root: Path, size: int, n_train: int = 5, seed: int = 0) -> Path:
    """The custom concepts: n_train renders each, with the generator's masks."""
    rng = np.random.default_rng([seed, 11])
    entries = []
    for name, obj in LOOKALIKES.items():
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            img, mask = render_concept(obj, rng, size, ("center", "left", "right")[i % 3] if i >= 3 else "center")
            img.save(root / "images" / name / f"{i:02d}.png")
            mask.save(root / "masks" / name / f"{i:02d}.png")
        entries.append(
            {
                "name": name,
                "token": f"<{name}>",
                "initializer": obj.cls,
                "class": obj.cls,
                "images": f"images/{name}",
                "masks": f"masks/{name}",
            }
        )
    (root / "concepts.json").write_text(json.dumps({"concepts": entries}, indent=2) + "\n")
    return root


def stage_argv(stage: str, base: Path, data: Path, out: Path, prev: Path | None, seed: int, steps: dict) -> list[str]:
    """Command line of one stage, identical across methods but for --stage_dir."""
    common = [
        "--pretrained_model_name_or_path",
        str(base),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--seed",
        str(seed),
        "--report_to",
        "none",
        "--num_vectors",
        "2",
    ]
    common += ["--stage_dir", str(prev)] if prev is not None else []
    if stage == "clif":
        # no common concepts: their masks would need a segmenter; the look-alikes are each other's negatives
        return [
            sys.executable,
            "-m",
            "train_clif",
            *common,
            "--common_words",
            "",
            "--cache_dir",
            str(out.parent / "stage1-cache"),
            "--num_pairs",
            "600",
            "--train_batch_size",
            "64",
            "--learning_rate",
            "5e-3",
            "--max_train_steps",
            str(steps["clif"]),
            "--lr_scheduler",
            "constant",
        ]
    diff = [
        "--resolution",
        str(steps["size"]),
        "--train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--cache_latents",
        "--lr_scheduler",
        "constant",
    ]
    if stage == "ti":
        return [
            sys.executable,
            "-m",
            "train_ti",
            *common,
            *diff,
            "--learning_rate",
            "5e-3",
            "--max_train_steps",
            str(steps["ti"]),
        ]
    return [
        sys.executable,
        "-m",
        "train_lora",
        *common,
        *diff,
        "--rank",
        "8",
        "--learning_rate",
        "1e-3",
        "--embedding_learning_rate",
        "1e-3",
        "--max_train_steps",
        str(steps["lora"]),
    ]


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


def run_method(method: str, base: Path, data: Path, work: Path, seed: int, steps: dict, cache: dict) -> Path:
    """Train `method`'s stages (reusing identical earlier stages across methods); returns the last stage dir."""
    prev, key = None, ()
    for stage in METHODS[method]:
        key = (*key, stage)
        out = work / f"seed{seed}" / "-".join(key)
        if key not in cache:
            if not (out / "clif_manifest.json").exists():
                if out.exists():  # a stage this experiment started but did not finish: start it again
                    import shutil

                    shutil.rmtree(out)
                cache.setdefault("_times", {})["-".join(key)] = run_cmd(
                    stage_argv(stage, base, data, out, prev, seed, steps), work / f"seed{seed}" / "log.txt"
                )
            cache[key] = out
        prev = cache[key]
    return prev


def generate(base: Path, stage: Path, out: Path, n: int, steps: int, log: Path) -> Path:
    prompts = out.with_suffix(".prompts.txt")
    prompts.write_text("\n".join(PAIR_PROMPTS) + "\n")
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
            ],
            log,
        )
    return out


def oracle_scores(oracle: Oracle, folder: Path) -> dict:
    """Per image: what the oracle sees left and right, and whether the two concepts were confused."""
    rows = []
    for side in sorted(folder.glob("*.json")):
        meta = json.loads(side.read_text())
        if "prompt" not in meta:
            continue
        prompt = meta["prompt"]
        a, b = [n for n in LOOKALIKES if f"<{n}>" in prompt]
        left, right = (a, b) if prompt.index(f"<{a}>") < prompt.index(f"<{b}>") else (b, a)
        img = Image.open(side.with_suffix(".png")).convert("RGB")
        pl, pr = oracle.halves(img)
        confused = pl == pr or OTHER in (pl, pr)
        rows.append(
            {
                "image": side.with_suffix(".png").name,
                "want": [left, right],
                "got": [pl, pr],
                "correct": [pl, pr] == [left, right],
                "swapped": [pl, pr] == [right, left],
                "confused": bool(confused),
            }
        )
    n = max(1, len(rows))
    return {
        "oracle_confusion": sum(r["confused"] for r in rows) / n,
        "oracle_correct": sum(r["correct"] for r in rows) / n,
        "oracle_swapped": sum(r["swapped"] for r in rows) / n,
        "n_images": len(rows),
        "rows": rows,
    }


def evaluate_folder(base: Path, data: Path, folder: Path, out: Path, log: Path) -> dict:
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
                str(base / "paired_clip"),
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
    # the held-out photos' matrix when the concepts have >= 3 photos, else the (labelled) train-photo one
    return next((conf[k] for k in ("held_out", "train_views") if (conf.get(k) or {}).get("views")), conf)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    base, work = Path(args.base), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    size = json.loads((base / "toyworld.json").read_text())["size"]
    steps = {"size": size, "clif": args.clif_steps, "ti": args.ti_steps, "lora": args.lora_steps}
    data = work / "concepts"
    if not (data / "concepts.json").exists():
        write_concept_set(data, size)
    oracle = train_oracle(LOOKALIKES, size, work / "oracle", steps=args.oracle_steps, n_train=args.oracle_crops)
    from concurrent.futures import ThreadPoolExecutor

    def one_seed(seed: int) -> tuple[dict, dict, dict, dict]:
        """Every method for one seed: its rows, stage-1 diagnostics, stage times, image folders."""
        (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        log, cache, rows, folders = work / f"seed{seed}" / "log.txt", {}, {}, {}
        for m in args.methods:
            stage = run_method(m, base, data, work, seed, steps, cache)
            folder = generate(
                base, stage, work / f"seed{seed}" / f"images-{m}", args.images_per_prompt, args.inference_steps, log
            )
            scores = oracle_scores(oracle, folder)
            ev = evaluate_folder(base, data, folder, work / f"seed{seed}" / f"eval-{m}", log)
            rows[m] = {k: v for k, v in scores.items() if k != "rows"}
            rows[m].update({k: v for k, v in ev.items() if isinstance(v, (int, float))})
            (folder / "oracle.json").write_text(json.dumps(scores, indent=2) + "\n")
            folders[m] = folder
        diag = stage1_diagnostics(cache[("clif",)]) if ("clif",) in cache else {}
        return rows, diag, {f"seed{seed}/{k}": v for k, v in cache.get("_times", {}).items()}, folders

    # the stages are subprocesses: seeds can run side by side (--jobs), results stay per seed
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = dict(zip(args.seeds, pool.map(one_seed, args.seeds)))
    per_seed = {m: [done[s][0][m] for s in args.seeds] for m in args.methods}
    diag = {f"seed{s}": done[s][1] for s in args.seeds if done[s][1]}
    times = {k: v for s in args.seeds for k, v in done[s][2].items()}
    last = done[args.seeds[0]][3]
    table = aggregate(per_seed)
    result = {
        "seeds": args.seeds,
        "steps": steps,
        "oracle_heldout_accuracy": oracle.heldout_accuracy,
        "table": table,
        "per_seed": per_seed,
        "stage1": diag,
        "times_s": times,
    }
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_table(table, work / "results.md", args.seeds, times, diag))
    side_by_side(last, work / "side_by_side.png")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="The pretrained world (python -m clif.toyworld pretrain --out).")
    p.add_argument("--out", required=True, help="Work folder: concept set, stage dirs, images, results.md/json.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training/generation seeds.")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        default=["ti", "ti_lora", "clif"],
        help="ti = stage 2 only; ti_lora = stages 2+3; clif = stages 1+2+3.",
    )
    p.add_argument("--clif_steps", type=int, default=300, help="Stage-1 steps.")
    p.add_argument("--ti_steps", type=int, default=400, help="Stage-2 steps.")
    p.add_argument("--lora_steps", type=int, default=300, help="Stage-3 steps.")
    p.add_argument("--images_per_prompt", type=int, default=8, help="Images per two-concept prompt.")
    p.add_argument("--inference_steps", type=int, default=30, help="Denoising steps.")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each stage (sets OMP_NUM_THREADS; 1 is fastest on a shared machine).",
    )
    p.add_argument("--jobs", type=int, default=1, help="Seeds run side by side (one core each is best on CPU).")
    p.add_argument("--oracle_crops", type=int, default=6000, help="Rendered half-crops the oracle trains on.")
    p.add_argument("--oracle_steps", type=int, default=1500, help="Training steps of the oracle classifier.")
