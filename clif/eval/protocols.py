"""Evaluation protocols of published work, so that our numbers can sit next to theirs (`evaluate.py --protocol`).

`customconcept101`: Custom Diffusion's CustomConcept101 evaluation, read at the source
(github.com/adobe-research/custom-diffusion, commit 7c19c9a, `customconcept101/evaluate.py` and
`customconcept101/README.md`). What their script does and what we do:

- Text alignment: OpenAI CLIP ViT-B/32 (`clip.load("ViT-B/32")`) = open_clip `ViT-B-32` + `openai` weights.
  Caption prefix: none. Their `CLIPCapDataset` has an optional "A photo depicts" prefix, but `clipeval` calls
  `get_clip_score` with the default `append=False`, so the prompt is encoded as it is (truncated at 77 tokens).
  Score: CLIPScore with w = 2.5: 2.5 * max(cos, 0) per image, averaged (`get_clip_score`). Their prompts.json
  text is whatever the sampler wrote; we replace each placeholder token by its class word (the paper's
  "modifier token removed" text), which their script cannot show either way.
- CLIP image alignment: the same CLIP; images resized (bicubic) to 224 on the shorter side, centre-cropped to
  224, CLIP mean/std (`CLIPImageDataset`); the mean of the cosine matrix between all generated images and all
  target images of a concept (`clipeval_image`), one number per concept (`CLIP Image alignment`,
  `CLIP Image alignment1`, ... for the '+'-separated target folders).
- DINO image alignment: `torch.hub` `dino_vits16` = transformers `facebook/dino-vits16`, the CLS token of the
  final (layer-normed) output; images resized (bicubic) to 256 on the shorter side, centre-cropped to 224,
  ImageNet mean/std (`DINOImageDataset`) -- not the transformers processor's 224x224 resize, so we apply
  their transform ourselves (`CDTransform`).
- Not reproduced: they run CLIP in fp16 on CUDA (`clip.load` keeps half weights there) and normalise features
  in numpy; we compute in fp32 and normalise in float64 (differences around 1e-3 in a cosine).

Their multi-concept table (CustomConcept101 README, 200 DDPM steps): Custom Diffusion (Joint) text 0.7567,
CLIP image 0.6680, DINO 0.3760; (Opt) 0.7627 / 0.6577 / 0.3650; DreamBooth 0.7383 / 0.6625 / 0.3816.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The settings `--protocol customconcept101` fixes (sizes: resize of the shorter side, then centre crop).
CUSTOMCONCEPT101 = {
    "clip_model": "ViT-B-32",
    "clip_pretrained": "openai",
    "clip_resize": 224,
    "clip_crop": 224,
    "dino": "facebook/dino-vits16",
    "dino_resize": 256,
    "dino_crop": 224,
    "caption_prefix": "",
    "clipscore_weight": 2.5,
}
PROTOCOLS = {"customconcept101": CUSTOMCONCEPT101}


@dataclass
class CDTransform:
    """Resize the shorter side (bicubic), centre-crop, RGB, to tensor, normalise: Custom Diffusion's test transform."""

    resize: int
    crop: int
    mean: tuple
    std: tuple

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        return Compose(
            [
                Resize(self.resize, interpolation=InterpolationMode.BICUBIC),
                CenterCrop(self.crop),
                lambda im: im.convert("RGB"),
                ToTensor(),
                Normalize(self.mean, self.std),
            ]
        )(image)


def clip_transform(settings: dict) -> CDTransform:
    return CDTransform(settings["clip_resize"], settings["clip_crop"], CLIP_MEAN, CLIP_STD)


class CDDino:
    """DINO CLS features with Custom Diffusion's transform (the Dino interface of clif.eval.evaluation: `.images`)."""

    def __init__(self, name: str, device, resize: int = 256, crop: int = 224):
        from transformers import AutoModel

        from clif.errors import loading

        with loading("DINO model", name):
            self.model = AutoModel.from_pretrained(name).to(device).eval().requires_grad_(False)
        self.transform = CDTransform(resize, crop, IMAGENET_MEAN, IMAGENET_STD)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        out = []
        for s in range(0, len(images), batch_size):
            px = torch.stack([self.transform(im) for im in images[s : s + batch_size]]).to(self.device)
            out.append(self.model(pixel_values=px).last_hidden_state[:, 0].double().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def resolve(name: str | None, args, defaults: dict) -> dict | None:
    """The protocol's settings, after checking that no flag given on the command line contradicts them.

    `args` holds the parsed flags, `defaults` the parser's defaults; a flag left at its default is taken over
    by the protocol, one set to another value is a UserError (the numbers would not be comparable).
    """
    from clif.errors import UserError

    if name is None:
        return None
    settings = PROTOCOLS[name]
    for flag in ("clip_model", "clip_pretrained", "dino"):
        given = getattr(args, flag)
        if given != defaults.get(flag) and given != settings[flag]:
            raise UserError(
                f"--protocol {name} fixes --{flag} {settings[flag]}; drop --{flag} {given} "
                "(other settings make the numbers incomparable with the published table)"
            )
    return dict(settings)
