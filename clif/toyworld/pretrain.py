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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny import clip_tokenizer, sd_scheduler
from .world import render_batch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PARTS = ("clip", "vae", "unet")


@dataclass
class Config:
    """Sizes and schedules of one pretraining run (`--preset` picks one; flags override fields)."""

    size: int = 32
    scenes: int = 40000
    text_width: int = 64
    text_layers: int = 4
    vit_width: int = 64
    vit_layers: int = 4
    patch: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers: int = 2
    clip_steps: int = 1500
    clip_batch: int = 256
    clip_lr: float = 1e-3
    vae_steps: int = 2500
    vae_batch: int = 64
    vae_lr: float = 5e-4
    unet_steps: int = 12000
    unet_batch: int = 128
    unet_lr: float = 4e-4
    ema: float = 0.999
    cfg_drop: float = 0.1
    seed: int = 0
    extra: dict = field(default_factory=dict)


PRESETS = {
    # sized for ~30 core-minutes on a shared 2-core machine (the issue-8 session had no GPU)
    "cpu": {
        "vae_channels": (16, 32, 64),
        "unet_channels": (48, 96, 96),
        "unet_layers": 1,
        "clip_steps": 300,
        "clip_batch": 192,
        "vae_steps": 800,
        "vae_batch": 32,
        "vae_lr": 1e-3,
        "unet_steps": 2000,
        "unet_batch": 48,
        "unet_lr": 8e-4,
        "ema": 0.995,
    },
    "gpu": {
        "size": 64,
        "scenes": 100000,
        "text_width": 128,
        "vit_width": 128,
        "patch": 8,
        "vae_channels": (32, 64, 128),
        "unet_channels": (96, 192, 192),
        "clip_steps": 4000,
        "clip_batch": 1024,
        "vae_steps": 6000,
        "vae_batch": 128,
        "unet_steps": 30000,
        "unet_batch": 256,
    },
    "test": {
        "scenes": 64,
        "text_width": 32,
        "text_layers": 1,
        "vit_width": 32,
        "vit_layers": 1,
        "vae_channels": (8, 16, 16),
        "unet_channels": (16, 32, 32),
        "unet_layers": 1,
        "clip_steps": 2,
        "clip_batch": 8,
        "vae_steps": 2,
        "vae_batch": 4,
        "unet_steps": 2,
        "unet_batch": 4,
    },
}

SAMPLE_CAPTIONS = (
    "a yellow ball with purple dots on the left and a blue box on the right",
    "a blue box on the left and a yellow ball with purple dots on the right",
    "a red star",
    "a green cup with white stripes on the right",
    "a pink ring on the left",
    "a small black heart with yellow checks",
    "a yellow ball with green stripes on the left and a yellow ball with purple dots on the right",
    "a white box with red checks and a black spot on the left and an orange star on the right",
)


# ---------------------------------------------------------------- models
def clip_config(cfg: Config):
    from transformers import CLIPConfig

    text = {
        "vocab_size": 49408,
        "hidden_size": cfg.text_width,
        "intermediate_size": 4 * cfg.text_width,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": cfg.text_width,
    }
    vision = {
        "hidden_size": cfg.vit_width,
        "intermediate_size": 4 * cfg.vit_width,
        "num_hidden_layers": cfg.vit_layers,
        "num_attention_heads": 4,
        "image_size": cfg.size,
        "patch_size": cfg.patch,
        "hidden_act": "quick_gelu",
        "projection_dim": cfg.text_width,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.text_width)


def build_vae(cfg: Config):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        block_out_channels=cfg.vae_channels,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=cfg.size,
    )


def build_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    c = cfg.unet_channels
    return UNet2DConditionModel(
        sample_size=cfg.size // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=c,
        layers_per_block=cfg.unet_layers,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * (len(c) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(c) - 1),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=4,
    )


def text_encoder_from(clip):
    """A CLIPTextModel holding exactly the CLIP text tower's weights (the diffusion model's frozen encoder)."""
    from transformers import CLIPTextModel

    enc = CLIPTextModel(clip.config.text_config)
    enc.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPTextModel is flat
    return enc.eval().requires_grad_(False)


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
) -> list[float]:
    """Generic resumable loop: AdamW, linear warm-up then cosine, optional EMA; returns the loss log."""
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
    bar = tqdm(range(start, steps), desc=f"pretrain {part}", initial=start, total=steps)
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
        if (step + 1) % every == 0 or step + 1 == steps:
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
            if part == "unet" and cfg.extra.get("on_checkpoint"):
                cfg.extra["on_checkpoint"](step + 1)
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


def pretrain_unet(cfg: Config, work: Path, lat: torch.Tensor, hid: torch.Tensor, empty: torch.Tensor, every: int):
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

    log = train_part(cfg, work, "unet", unet, cfg.unet_steps, cfg.unet_lr, loss_fn, every, ema=ema)
    return ema, log


# ---------------------------------------------------------------- assembly and samples
def assemble(clip, vae, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder_from(clip),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_world(pipe, clip, cfg: Config, out: Path) -> None:
    """The pipeline folder + `paired_clip/` + `toyworld.json` (the config the world was made with)."""
    from transformers import CLIPImageProcessor

    pipe.save_pretrained(out)
    clip.save_pretrained(out / "paired_clip")
    CLIPImageProcessor(
        size={"shortest_edge": cfg.size},
        crop_size={"height": cfg.size, "width": cfg.size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out / "paired_clip")
    clip_tokenizer().save_pretrained(out / "paired_clip")  # evaluate.py reads the folder as a whole CLIP
    meta = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    (out / "toyworld.json").write_text(json.dumps(meta, indent=2) + "\n")


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
    lat, hid = encode_all(vae, encoder, imgs, ids)
    with torch.no_grad():
        empty = encoder(
            clip_tokenizer()([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ).last_hidden_state[0]
    if grids:

        def on_ckpt(step: int) -> None:
            ema_now = build_unet(cfg)
            ema_now.load_state_dict(_load(work / "unet.ckpt")["ema"])
            sample_grid(
                assemble(clip, vae, ema_now.eval()), work / "grids" / f"unet_{step:06d}.png", seeds=(0, 1), steps=20
            )

        cfg.extra["on_checkpoint"] = on_ckpt
    unet, unet_log = pretrain_unet(cfg, work, lat, hid, empty, every)
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
    p.add_argument("--seed", type=int, default=0, help="Seed of the world and of every weight init.")
    p.add_argument("--checkpoint_every", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    p.add_argument("--unet_steps", type=int, default=None, help="Override the preset's UNet steps.")
    p.add_argument("--no_grids", action="store_true", help="Skip the sample grids (faster; tests).")
    p.add_argument(
        "--part",
        choices=["all", "clip", "vae"],
        default="all",
        help="Train only CLIP or only the VAE (independent: run both at once, then 'all').",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores; 1 is fastest when the cores are shared).",
    )


def run(args: argparse.Namespace) -> Path:
    cfg = Config(**{**PRESETS[args.preset], "seed": args.seed})
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    torch.set_num_threads(args.threads or max(1, min(16, os.cpu_count() or 1)))
    return pretrain(cfg, out, work, args.checkpoint_every, grids=not args.no_grids, part=args.part)
