"""The renderability gate: can the base draw what tells the concepts apart? Measured before any method is compared.

200 captions drawn from the world (1-2 objects, fixed seeds) are sampled with the base; the referee reads every
sample and compares it with the caption's scene. The same scenes rendered and sent through the VAE give the
ceiling (what a perfect UNet could reach through this decoder and this referee).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from clif import cli

from .referee import ATTRIBUTES, Referee, score_reads, vae_round_trip
from .world import Scene, random_scene, render

# what the base's samples must reach (fractions): count and slot of the objects, body colour, identity attributes
THRESHOLDS = {"count": 0.90, "layout": 0.90, "color": 0.85, "cls": 0.80, "pattern": 0.80, "pattern_color": 0.80}
LABELS = {
    "count": "object count",
    "layout": "slot (layout)",
    "color": "body colour (6 colours)",
    "cls": "class (3)",
    "pattern": "mark (solid / top / band / spot)",
    "pattern_color": "mark colour (6 colours)",
    "identity": "whole identity (all four)",
}


def gate_scenes(n: int = 200, seed: int = 2024) -> list[Scene]:
    """The gate's captions: `n` world scenes from a fixed seed, never templated."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


@torch.no_grad()
def sample(pipe, captions: list[str], *, seed: int, steps: int, guidance: float, batch: int = 50) -> np.ndarray:
    """One sample per caption, caption i from generator seed `seed + i` (uint8 [N, H, W, 3])."""
    out = []
    for s in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(s, min(s + batch, len(captions)))]
        imgs = pipe(
            captions[s : s + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        ).images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def evaluate_gate(
    samples: np.ndarray, scenes: list[Scene], referee: Referee, ceiling: np.ndarray | None = None
) -> dict:
    """Per measure: the samples' accuracy, the threshold, pass/fail; and the round-trip ceiling if given."""
    got = score_reads(referee.read(samples), scenes)
    top = score_reads(referee.read(ceiling), scenes) if ceiling is not None else {}
    rows = {}
    for k in LABELS:
        rows[k] = {"samples": got[k], "threshold": THRESHOLDS.get(k), "ceiling": top.get(k)}
        rows[k]["passed"] = None if k not in THRESHOLDS else bool(got[k] >= THRESHOLDS[k])
    return {
        "n": len(scenes),
        "rows": rows,
        "passed": all(r["passed"] for r in rows.values() if r["passed"] is not None),
    }


def gate_table(result: dict) -> str:
    lines = [
        f"| measure ({result['n']} captions) | base samples | VAE round trip of the render (ceiling) | needed | |",
        "|---|---|---|---|---|",
    ]
    for k, r in result["rows"].items():
        ceiling = "–" if r["ceiling"] is None else f"{r['ceiling']:.3f}"
        need = "–" if r["threshold"] is None else f"≥ {r['threshold']:.2f}"
        mark = {True: "pass", False: "**FAIL**", None: ""}[r["passed"]]
        lines.append(f"| {LABELS[k]} | {r['samples']:.3f} | {ceiling} | {need} | {mark} |")
    lines.append(f"\nGate: **{'passed' if result['passed'] else 'failed'}**")
    return "\n".join(lines)


def run_gate(
    pipe, referee: Referee, out: Path, *, n: int = 200, seed: int = 2024, steps: int = 30, guidance: float = 4.0
) -> dict:
    """Sample the gate's captions with `pipe`, score them, write gate.json / gate.md / a sample sheet to `out`."""
    scenes = gate_scenes(n, seed)
    size = referee.meta["size"]
    samples = sample(pipe, [s.caption() for s in scenes], seed=seed, steps=steps, guidance=guidance)
    renders = np.stack([np.asarray(render(s, size)[0]) for s in scenes])
    result = evaluate_gate(samples, scenes, referee, ceiling=vae_round_trip(pipe.vae, renders))
    result.update(seed=seed, steps=steps, guidance=guidance, attributes=list(ATTRIBUTES))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gate.md").write_text(gate_table(result) + "\n")
    _sheet(samples[:24], scenes[:24], referee, out / "gate_samples.png")
    return result


def _sheet(samples: np.ndarray, scenes: list[Scene], referee: Referee, path: Path) -> None:
    """The first samples with their captions and what the referee read (matplotlib)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reads = referee.read(samples)
    cols = 6
    rows = (len(samples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, sc, rd in zip(axes.flat, samples, scenes, reads):
        ax.imshow(img, interpolation="nearest")
        seen = " | ".join(f"{o.slot}: {o.phrase()[2:]}" for o in rd.objects()) or "nothing"
        ax.set_title("\n".join(textwrap.wrap(sc.caption(), 34) + textwrap.wrap("read: " + seen, 34)), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_base(base: Path):
    """The world's pipeline (fp32, CPU) and its VAE."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def referee_and_gate(base: Path, referee_dir: Path, gate_dir: Path, size: int, **gate_kw) -> tuple[Referee, dict]:
    """The referee (loaded, or trained on the base VAE's round trips) and the base's gate (cached in gate_dir)."""
    from .referee import train_referee

    pipe = load_base(base)
    referee = train_referee(pipe.vae, size, referee_dir, **gate_kw.pop("referee_kw", {}))
    if (gate_dir / "gate.json").is_file():
        gate = json.loads((gate_dir / "gate.json").read_text())
    else:
        gate = run_gate(pipe, referee, gate_dir, **gate_kw)
    print(gate_table(gate))
    return referee, gate


def add_args(p) -> None:
    p.add_argument("--base", required=True, help="The pretrained world (python -m clif.toyworld pretrain --out).")
    p.add_argument("--referee", required=True, help="Referee folder (loaded if there, else trained and saved).")
    p.add_argument("--out", required=True, help="Where gate.json, gate.md and gate_samples.png go.")
    p.add_argument("--captions", type=cli.count(10**5), default=200, help="World captions to sample (one image each).")
    p.add_argument(
        "--referee_scenes", type=cli.count(10**6), default=16000, help="Rendered scenes the referee trains on."
    )
    p.add_argument("--referee_steps", type=cli.count(10**6), default=2500, help="Training steps of the referee.")
    p.add_argument("--threads", type=cli.count(1024), default=None, help="torch CPU threads.")


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    base, out = Path(args.base), Path(args.out)
    (out / "gate.json").unlink(missing_ok=True)  # measure again: the base may have changed
    size = json.loads((base / "toyworld.json").read_text())["size"]
    return referee_and_gate(
        base,
        Path(args.referee),
        out,
        size,
        n=args.captions,
        referee_kw={"n_train": args.referee_scenes, "steps": args.referee_steps},
    )[1]
