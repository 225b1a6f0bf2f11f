"""Seeded, randomly initialised, architecturally faithful tiny pipelines for offline tests and demos.

`python -m clif.tiny --family sd15|sdxl --out DIR` writes a diffusers pipeline folder (real 49408-token
CLIP BPE tokenizer, built from the vocab file that ships inside open_clip_torch) plus `paired_clip/`
(SDXL: also `paired_clip_2/`): a tiny transformers CLIPModel whose text tower holds exactly the weights
of the matching text encoder, for stage 1. The same command always writes the same weights.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
from pathlib import Path

import torch

TEXT_DIM = 32
SDXL_TEXT2_DIM = 32


def _bpe_path() -> Path:
    dist = importlib.metadata.distribution("open_clip_torch")
    for f in dist.files or []:
        if f.name == "bpe_simple_vocab_16e6.txt.gz":
            return Path(dist.locate_file(f))
    raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz not found inside open_clip_torch")


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode map of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49408 ids), built offline from open_clip's vocab file."""
    from transformers import CLIPTokenizer

    with gzip.open(_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
    )


def _text_config(hidden: int, projection: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _vision_config(layers: int) -> dict:
    """A tiny ViT image tower (64 px, patch 8) for the tiny CLIPSeg / OWLv2 models."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
    }


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


def sd_scheduler(prediction_type: str = "epsilon"):
    """SD 1.x's noise schedule (scaled-linear betas 0.00085-0.012) as a DDIM scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _paired_clip(text_encoder, out: Path, seed: int) -> None:
    """A tiny CLIPModel whose text tower (and projection, when the encoder has one) equals `text_encoder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    tcfg = text_encoder.config
    vcfg = CLIPVisionConfig(**_vision_config(2), projection_dim=tcfg.projection_dim)
    clip = CLIPModel(
        CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=tcfg.projection_dim)
    )
    # transformers 5: CLIPTextModel is flat, CLIPTextModelWithProjection nests a text_model
    clip.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
    if hasattr(text_encoder, "text_projection"):
        clip.text_projection.load_state_dict(text_encoder.text_projection.state_dict())
    clip.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)


def build_clipseg(out: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIPSeg (text-prompted segmenter) with the real CLIP tokenizer: offline stand-in for
    CIDAS/clipseg-rd64-refined in tests (its masks are arbitrary but deterministic)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    torch.manual_seed(seed)
    text = _text_config(TEXT_DIM, TEXT_DIM).to_dict()
    vision = _vision_config(3)
    model = CLIPSegForImageSegmentation(
        CLIPSegConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=32,
            extract_layers=(0, 1, 2),
            reduce_dim=16,
            decoder_intermediate_size=32,
        )
    )
    out = Path(out)
    model.save_pretrained(out)
    image_processor = ViTImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )
    CLIPSegProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(out)
    return out


def build_openclip(out: str | Path, seed: int = 0) -> Path:
    """A tiny random open_clip model, loadable as `local-dir:<out>` (evaluate.py tests and demo)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": cfg,
                "preprocess_cfg": {
                    "mean": [0.48145466, 0.4578275, 0.40821073],
                    "std": [0.26862954, 0.26130258, 0.27577711],
                },
            },
            indent=2,
        )
    )
    return out


def build_owlv2(out: str | Path, seed: int = 0) -> Path:
    """A tiny random OWLv2 detector (evaluate.py --detector): arbitrary but deterministic boxes, offline."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(seed)
    text = _text_config(TEXT_DIM, TEXT_DIM).to_dict()
    vision = _vision_config(2)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    out = Path(out)
    model.save_pretrained(out)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=clip_tokenizer()
    ).save_pretrained(out)
    return out


def build_dino(out: str | Path, seed: int = 0) -> Path:
    """A tiny random ViT with a ViT image processor: stands in for facebook/dino-vits16 (evaluate.py --dino)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    out = Path(out)
    ViTModel(
        ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ).save_pretrained(out)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)
    return out


def build_dinov2(out: str | Path, seed: int = 0) -> Path:
    """A tiny random DINOv2 (Dinov2Model + its BitImageProcessor): stands in for facebook/dinov2-base (D&C)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    out = Path(out)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=64, patch_size=8
    )
    Dinov2Model(cfg).save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": 72},
        crop_size={"height": 64, "width": 64},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out)
    return out


def build(family: str, out: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny `family` pipeline folder (and its paired CLIP models) to `out`; returns `out`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    torch.manual_seed(seed)
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(TEXT_DIM, TEXT_DIM))
    if family == "sd15":
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=4,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=sd_scheduler(prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(SDXL_TEXT2_DIM, SDXL_TEXT2_DIM, act="gelu"))
        time_dim = 8
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_DIM + SDXL_TEXT2_DIM,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=time_dim * 6 + SDXL_TEXT2_DIM,
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=sd_scheduler(prediction_type),
        )
    elif family == "clipseg":
        return build_clipseg(out, seed)
    elif family in ("openclip", "owlv2", "dino", "dinov2"):
        builders = {"openclip": build_openclip, "owlv2": build_owlv2, "dino": build_dino, "dinov2": build_dinov2}
        return builders[family](out, seed)
    else:
        raise ValueError(f"unknown family {family!r}")
    pipe.save_pretrained(out)
    _paired_clip(text_encoder, out / "paired_clip", seed + 1)
    if family == "sdxl":
        _paired_clip(text_encoder_2, out / "paired_clip_2", seed + 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m clif.tiny", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--family",
        choices=["sd15", "sdxl", "clipseg", "openclip", "owlv2", "dino", "dinov2"],
        required=True,
        help="sd15/sdxl: a diffusion pipeline (+ paired CLIPs); clipseg: a text-prompted segmenter; "
        "openclip: an open_clip model for evaluate.py (--clip_model local-dir:DIR); owlv2: a "
        "detector (--detector DIR); dino: a ViT (--dino DIR); dinov2: a DINOv2 (--dc_model DIR).",
    )
    p.add_argument("--out", required=True, help="Folder to write the pipeline into.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    p.add_argument(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default="epsilon",
        help="Scheduler prediction type (v_prediction mimics SD 2.x).",
    )
    args = p.parse_args(argv)
    print(build(args.family, args.out, args.seed, args.prediction_type))


if __name__ == "__main__":
    main()
