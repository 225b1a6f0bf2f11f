"""Pretrain the toy world's base model: CLIP (text + image tower) -> VAE -> UNet, into a diffusers
`StableDiffusionPipeline` folder whose text encoder *is* the CLIP text tower (as in SD), plus `paired_clip/`
(the CLIP model itself, for stage 1 and evaluation).

Each part checkpoints every `--checkpoint_every` steps under `--work` and resumes from there; a batch and its
noise depend only on (seed, part, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clif import cli
from clif.fixtures.tiny import clip_tokenizer, sd_scheduler

from .models import (
    CLIP_MEAN,
    CLIP_STD,
    PRESETS,
    Config,
    assemble,
    build_unet,
    build_vae,
    clip_config,
    save_world,
    text_encoder_from,
)
from .report import plot_losses, sample_grid
from .world import render_batch

PARTS = ("clip", "vae", "unet")


# ---------------------------------------------------------------- data
def to_tensor(imgs: np.ndarray, normalize: str) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W]; 'clip' = CLIP mean/std, 'vae' = [-1, 1]."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    if normalize == "vae":
        return x * 2 - 1
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def world_data(cfg: Config, work: Path) -> tuple[np.ndarray, list[str], torch.Tensor]:
    """The pretraining scenes (rendered once, cached in `work`), their captions and token ids [N, 77]."""
    cache = work / f"data_{cfg.size}px_{cfg.scenes}_seed{cfg.seed}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        imgs, caps = z["images"], [str(c) for c in z["captions"]]
    else:
        imgs, caps = [], []
        chunk = 2000
        for s in tqdm(range(0, cfg.scenes, chunk), desc="render world", unit="chunk"):
            i, c = render_batch(cfg.seed * 1_000_003 + s, min(chunk, cfg.scenes - s), cfg.size)
            imgs.append(i)
            caps += c
        imgs = np.concatenate(imgs)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=imgs, captions=np.array(caps))
        os.replace(tmp, cache)
    tok = clip_tokenizer()
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return imgs, caps, ids


def batch_index(cfg: Config, part: str, step: int, n: int, size: int) -> np.ndarray:
    """Indices of batch `step` of `part`: a function of (seed, part, step) only, so resume is exact."""
    return np.random.default_rng([cfg.seed, PARTS.index(part), step]).integers(0, n, size)


# ---------------------------------------------------------------- checkpointing
def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.exists() else None


def train_part(
    cfg: Config,
    work: Path,
    part: str,
    model: torch.nn.Module,
    steps: int,
    lr: float,
    loss_fn,
    every: int,
    ema: torch.nn.Module | None = None,
    on_checkpoint=None,
    stop_at: int | None = None,
) -> list[float]:
    """Generic resumable loop: AdamW, linear warm-up then cosine, optional EMA; returns the loss log.

    `on_checkpoint(step, model)` runs after each checkpoint with the EMA model (else the trained one)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    warm = max(1, min(500, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    ckpt, log, start = work / f"{part}.ckpt", [], 0
    state = _load(ckpt)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, log = int(state["step"]), list(state["log"])
    model.train()
    end = min(steps, stop_at or steps)  # stop early, on the full schedule's learning rates
    bar = tqdm(range(start, end), desc=f"pretrain {part}", initial=start, total=end)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - cfg.ema)
        log.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(log[-50:]):.4f}")
        if (step + 1) % every == 0 or step + 1 == end:
            _save(
                ckpt,
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {},
                    "step": step + 1,
                    "log": log,
                },
            )
            if on_checkpoint is not None:
                on_checkpoint(step + 1, ema if ema is not None else model)
    model.eval()
    return log


# ---------------------------------------------------------------- the three parts
def pretrain_clip(cfg: Config, work: Path, imgs: np.ndarray, ids: torch.Tensor, every: int):
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed)
    clip = CLIPModel(clip_config(cfg))
    # causal text tower: the pooled (first-EOS) feature ignores trailing padding, so drop it for speed
    ids = ids[:, : int((ids != 49407).sum(1).max()) + 1]

    def loss_fn(step: int) -> torch.Tensor:
        idx = batch_index(cfg, "clip", step, len(imgs), cfg.clip_batch)
        out = clip(input_ids=ids[idx], pixel_values=to_tensor(imgs[idx], "clip"))
        same = ids[idx].unsqueeze(0).eq(ids[idx].unsqueeze(1)).all(-1).float()  # duplicate captions: multi-positive
        soft = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(out.logits_per_image, soft) + F.cross_entropy(out.logits_per_text, soft))

    log = train_part(cfg, work, "clip", clip, cfg.clip_steps, cfg.clip_lr, loss_fn, every)
    return clip.eval().requires_grad_(False), log


@torch.no_grad()
def clip_retrieval(clip, imgs: np.ndarray, ids: torch.Tensor, n: int = 256) -> float:
    """Image->text top-1 accuracy over `n` held-out scenes (chance 1/n)."""
    out = clip(input_ids=ids[:n], pixel_values=to_tensor(imgs[:n], "clip"))
    return float((out.logits_per_image.argmax(1) == torch.arange(len(out.logits_per_image))).float().mean())


def pretrain_vae(cfg: Config, work: Path, imgs: np.ndarray, every: int):
    torch.manual_seed(cfg.seed + 1)
    vae = build_vae(cfg)

    def loss_fn(step: int) -> torch.Tensor:
        idx = batch_index(cfg, "vae", step, len(imgs), cfg.vae_batch)
        x = to_tensor(imgs[idx], "vae")
        post = vae.encode(x).latent_dist
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl

    log = train_part(cfg, work, "vae", vae, cfg.vae_steps, cfg.vae_lr, loss_fn, every)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode(to_tensor(imgs[s : s + 256], "vae")).latent_dist.mean
                for s in range(0, min(1024, len(imgs)), 256)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae, log


@torch.no_grad()
def encode_all(vae, encoder, imgs: np.ndarray, ids: torch.Tensor, bs: int = 512):
    """Scaled latent means and frozen text hidden states of every scene (the UNet's inputs; cached in RAM)."""
    lat, hid = [], []
    for s in tqdm(range(0, len(imgs), bs), desc="encode world"):
        lat.append(vae.encode(to_tensor(imgs[s : s + bs], "vae")).latent_dist.mean * vae.config.scaling_factor)
        hid.append(encoder(ids[s : s + bs]).last_hidden_state.half())
    return torch.cat(lat), torch.cat(hid)


def pretrain_unet(
    cfg: Config, work: Path, lat: torch.Tensor, hid: torch.Tensor, empty: torch.Tensor, every: int, on_checkpoint=None
):
    import copy

    torch.manual_seed(cfg.seed + 2)
    unet = build_unet(cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = sd_scheduler()
    acp = sched.alphas_cumprod

    def loss_fn(step: int) -> torch.Tensor:
        idx = batch_index(cfg, "unet", step, len(lat), cfg.unet_batch)
        g = torch.Generator().manual_seed(cfg.seed * 104729 + step)
        x0, cond = lat[idx], hid[idx].float()
        drop = torch.rand(len(idx), generator=g) < cfg.cfg_drop
        cond[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, eps)

    log = train_part(
        cfg,
        work,
        "unet",
        unet,
        cfg.unet_steps,
        cfg.unet_lr,
        loss_fn,
        every,
        ema=ema,
        on_checkpoint=on_checkpoint,
        stop_at=cfg.unet_stop_at,
    )
    return ema, log


def pretrain(cfg: Config, out: Path, work: Path, every: int, grids: bool = True, part: str = "all") -> Path:
    """Train CLIP -> VAE -> UNet (each resumable), write the world to `out`; returns `out`.

    `part` clip/vae trains only that part (the two are independent and may run in parallel processes)."""
    work.mkdir(parents=True, exist_ok=True)
    imgs, _caps, ids = world_data(cfg, work)
    held = slice(0, 256)  # CLIP / VAE checks use the first scenes of a separate seed
    h_imgs, _, h_ids = world_data(
        Config(**{**asdict(cfg), "scenes": min(256, cfg.scenes), "seed": cfg.seed + 999}), work
    )
    if part == "vae":
        pretrain_vae(cfg, work, imgs, every)
        return work
    clip, clip_log = pretrain_clip(cfg, work, imgs, ids, every)
    if part == "clip":
        return work
    stats = {
        "clip_retrieval_top1_heldout": clip_retrieval(clip, h_imgs[held], h_ids[held]),
        "clip_retrieval_chance": 1 / len(h_imgs[held]),
    }
    vae, vae_log = pretrain_vae(cfg, work, imgs, every)
    with torch.no_grad():
        x = to_tensor(h_imgs[:64], "vae")
        stats["vae_heldout_mse"] = float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))
    encoder = text_encoder_from(clip)
    finished = (_load(work / "unet.ckpt") or {}).get("step", 0) >= min(
        cfg.unet_steps, cfg.unet_stop_at or cfg.unet_steps
    )
    # a finished UNet needs no training inputs: resuming it only writes the world
    lat, hid = (None, None) if finished else encode_all(vae, encoder, imgs, ids)
    with torch.no_grad():
        empty = encoder(
            clip_tokenizer()([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ).last_hidden_state[0]

    def on_ckpt(step: int, ema: torch.nn.Module) -> None:
        path = work / "grids" / f"unet_{step:06d}.png"
        sample_grid(assemble(clip, vae, ema.eval()), path, seeds=(0, 1), steps=20)

    unet, unet_log = pretrain_unet(cfg, work, lat, hid, empty, every, on_checkpoint=on_ckpt if grids else None)
    pipe = assemble(clip, vae, unet)
    tmp = out.with_name(out.name + ".tmp")
    save_world(pipe, clip, cfg, tmp)
    stats.update(
        unet_final_loss=float(np.mean(unet_log[-200:])),
        clip_final_loss=float(np.mean(clip_log[-100:])),
        vae_final_loss=float(np.mean(vae_log[-100:])),
    )
    (tmp / "pretrain_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_losses({"clip": clip_log, "vae": vae_log, "unet": unet_log}, work / "losses.png")
    if grids:
        sample_grid(pipe, work / "samples.png")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="Folder to write the pretrained world (a diffusers pipeline) into.")
    p.add_argument("--work", default=None, help="Checkpoints, data cache, sample grids (default: OUT.work).")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="cpu: 32 px, fits ~1 h on 2 cores; gpu: 64 px, larger; test: tiny, 2 steps per part.",
    )
    p.add_argument("--seed", type=cli.seed_type(), default=0, help="Seed of the world and of every weight init.")
    p.add_argument(
        "--checkpoint_every", type=cli.count(10**6), default=500, help="Save a resumable checkpoint every N steps."
    )
    p.add_argument(
        "--unet_steps", type=cli.count(10**7), default=None, help="Override the preset's UNet steps (its schedule)."
    )
    p.add_argument(
        "--unet_stop_at",
        type=cli.number(int, 0, 10**7),
        default=None,
        help="Stop the UNet after this step, on the full schedule's learning rates (the cpu preset stops at 1750 of "
        "2500, as the committed base did); 0 = run the whole schedule.",
    )
    p.add_argument("--no_grids", action="store_true", help="Skip the sample grids (faster; tests).")
    p.add_argument(
        "--part",
        choices=["all", "clip", "vae"],
        default="all",
        help="Train only CLIP or only the VAE (independent: run both at once, then 'all').",
    )
    p.add_argument(
        "--threads",
        type=cli.count(1024),
        default=None,
        help="torch CPU threads (default: all cores; 1 is fastest when the cores are shared).",
    )


def run(args: argparse.Namespace) -> Path:
    cfg = Config(**{**PRESETS[args.preset], "seed": args.seed})
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    if args.unet_stop_at is not None:
        cfg.unet_stop_at = args.unet_stop_at or None
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    torch.set_num_threads(args.threads or max(1, min(16, os.cpu_count() or 1)))
    return pretrain(cfg, out, work, args.checkpoint_every, grids=not args.no_grids, part=args.part)
