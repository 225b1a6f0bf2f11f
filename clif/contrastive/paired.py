"""The frozen CLIP models paired with the diffusion model's text encoders (stage 1)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from clif.errors import UserError, loading
from clif.validate import ModelSource

# text-encoder width -> the public CLIP whose text tower it is
DEFAULT_PAIRS = {
    768: "openai/clip-vit-large-patch14",
    1024: "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    1280: "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
}


def default_pair(base: str, index: int, hidden: int) -> str:
    """`<base>/paired_clip[_2]` when the base folder ships one (tiny models), else the public CLIP of that width."""
    local = Path(base) / ("paired_clip" if index == 0 else f"paired_clip_{index + 1}")
    if local.is_dir():
        return str(local)
    if hidden not in DEFAULT_PAIRS:
        raise UserError(f"no known CLIP model pairs with a {hidden}-wide text encoder; pass --clip_model")
    return DEFAULT_PAIRS[hidden]


def pair_names(base: str, given: list[str | None], text_encoders: list) -> list[str]:
    """The CLIP paired with each text encoder: the one given (--clip_model, --clip_model_2), else default_pair."""
    return [
        name or default_pair(base, i, enc.config.hidden_size)
        for i, (name, enc) in enumerate(zip([*given, None, None], text_encoders))
    ]


def pair_sources(names: list[str], given: list[str | None]) -> list[ModelSource]:
    """The paired CLIPs as models to check before any loads (clif.validate.check_models)."""
    flags = ["--clip_model", "--clip_model_2"]
    return [
        ModelSource(
            flag,
            name,
            "CLIP model",
            f"give {flag} a local CLIPModel folder (the CLIP paired with the text encoder)",
            named=g is not None,
        )
        for flag, name, g in zip(flags, names, [*given, None, None])
    ]


def clip_image_size(name_or_path: str) -> int:
    """Input resolution of a CLIP model's image tower (reads only its config); UserError when unloadable."""
    from transformers import CLIPConfig

    with loading("CLIP model", name_or_path):
        return CLIPConfig.from_pretrained(name_or_path).vision_config.image_size


class PairedCLIP:
    """Frozen CLIP image tower + text projection matching one text encoder of the diffusion model."""

    def __init__(self, name_or_path: str, text_encoder, device, dtype: torch.dtype):
        from transformers import CLIPImageProcessor, CLIPModel

        with loading("CLIP model", name_or_path):
            self.model = CLIPModel.from_pretrained(name_or_path, dtype=dtype).to(device).eval().requires_grad_(False)
            self.processor = CLIPImageProcessor.from_pretrained(name_or_path)
        width = text_encoder.config.hidden_size
        if self.model.text_projection.in_features != width:
            raise UserError(
                f"CLIP model {name_or_path!r} has a {self.model.text_projection.in_features}-wide text "
                f"tower, the diffusion text encoder is {width} wide: not its matching CLIP"
            )
        self.name, self.device = name_or_path, device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().float()

    @torch.no_grad()
    def image_features(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Projected image features [N, P] (fp32), computed once: the image tower is frozen."""
        feats = []
        for s in range(0, len(images), batch_size):
            px = self.processor(images=images[s : s + batch_size], return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=px.to(self.device, self.model.dtype))
            feats.append(out.pooler_output.float())  # transformers 5: the projected embedding
        return torch.cat(feats)

    def text_features(self, encoder, input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        """The encoder's pooled output (final-LN hidden state at the first EOS) through this CLIP's projection."""
        ids = input_ids.to(encoder.device)
        hidden = encoder(ids).last_hidden_state  # post final-LN, for CLIPTextModel and ...WithProjection
        eos = (ids == eos_id).int().argmax(dim=-1)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), eos]
        return self.model.text_projection(pooled.to(self.model.dtype)).float()
