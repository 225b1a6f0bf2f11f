"""The toy world's model definitions: run configs and presets, the CLIP / VAE / UNet builders, and the
assembly of a diffusers `StableDiffusionPipeline` folder whose text encoder is the CLIP text tower."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from clif.fixtures.tiny import clip_tokenizer, sd_scheduler

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    top_attention: bool = True  # attention at the UNet's full latent resolution (costly at 16x16)
    clip_steps: int = 1500
    clip_batch: int = 256
    clip_lr: float = 1e-3
    vae_steps: int = 2500
    vae_batch: int = 64
    vae_lr: float = 5e-4
    unet_steps: int = 12000
    unet_batch: int = 128
    unet_lr: float = 4e-4
    unet_stop_at: int | None = None  # stop after this step, keeping the unet_steps schedule
    ema: float = 0.999
    cfg_drop: float = 0.1
    seed: int = 0


PRESETS = {
    # 32 px, 16x16x4 latents (VAE 2x down); about 1.5 h on a shared 2-core machine in the background
    "cpu": {
        "vae_channels": (32, 64),
        "unet_channels": (64, 128, 192),
        "unet_layers": 1,
        "top_attention": False,
        "clip_steps": 1000,
        "clip_batch": 256,
        "vae_steps": 1500,
        "vae_batch": 64,
        "vae_lr": 1e-3,
        "unet_steps": 2500,
        "unet_stop_at": 1750,  # the committed base: stopped at 1,750 of the 2,500-step schedule (time)
        "unet_batch": 64,
        "unet_lr": 8e-4,
        "ema": 0.998,
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
    down = ["CrossAttnDownBlock2D"] * (len(c) - 1) + ["DownBlock2D"]
    if not cfg.top_attention:  # the last level (4x4) keeps cross-attention instead of the first
        down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(c) - 1)
    return UNet2DConditionModel(
        sample_size=cfg.size // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=c,
        layers_per_block=cfg.unet_layers,
        norm_num_groups=8,
        down_block_types=tuple(down),
        up_block_types=tuple(reversed([d.replace("Down", "Up") for d in down])),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=4,
    )


def text_encoder_from(clip):
    """A CLIPTextModel holding exactly the CLIP text tower's weights (the diffusion model's frozen encoder)."""
    from transformers import CLIPTextModel

    enc = CLIPTextModel(clip.config.text_config)
    enc.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPTextModel is flat
    return enc.eval().requires_grad_(False)


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
    meta = asdict(cfg)
    (out / "toyworld.json").write_text(json.dumps(meta, indent=2) + "\n")


VISION_SHARD = "model-vision.safetensors"  # paired_clip/'s own weights after share_text_tower


def share_text_tower(folder: Path) -> bool:
    """Store the CLIP text tower once: `text_encoder/model.safetensors` holds it (under the `text_model.` names both
    loaders accept) and `paired_clip/` becomes a two-shard checkpoint whose index points its text weights at that
    file and keeps only the vision tower, projections and logit scale itself. `CLIPModel.from_pretrained` and the
    pipeline load exactly the same tensors as before. Returns False when already done."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    te_file, clip_file = folder / "text_encoder" / "model.safetensors", folder / "paired_clip" / "model.safetensors"
    if not clip_file.exists():
        return False
    clip = load_file(str(clip_file))
    text = {f"text_model.{k}" if not k.startswith("text_model.") else k: v for k, v in load_file(str(te_file)).items()}
    if not all(k in clip and torch.equal(clip[k], v) for k, v in text.items()):
        raise ValueError(f"{folder}: text_encoder/ is not paired_clip/'s text tower")
    own = {k: v for k, v in clip.items() if k not in text}
    index = {"metadata": {}, "weight_map": {k: "../text_encoder/model.safetensors" for k in text}}
    index["weight_map"] |= {k: VISION_SHARD for k in own}
    for path, tensors in ((te_file, text), (folder / "paired_clip" / VISION_SHARD, own)):
        save_file(tensors, str(path.with_suffix(".tmp")), {"format": "pt"})
        os.replace(path.with_suffix(".tmp"), path)
    (folder / "paired_clip" / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    clip_file.unlink()
    return True


def to_fp16_files(folder: Path) -> int:
    """Rewrite every float32 tensor of the world's safetensors files as float16, in place (half the bytes to
    commit). diffusers and transformers load them back as float32 models. Returns the files rewritten."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    n = 0
    for f in sorted(Path(folder).rglob("*.safetensors")):
        sd = load_file(str(f))
        if not any(v.dtype == torch.float32 for v in sd.values()):
            continue
        tmp = f.with_suffix(".tmp")
        save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}, str(tmp), {"format": "pt"})
        os.replace(tmp, f)
        n += 1
    return n
