"""The models evaluate.py scores with: a CLIP backbone (open_clip, or a transformers CLIPModel such as the toy
world's), DINO, the OWLv2 detector; `open_models` opens those a run needs, once clif.eval.sources checked them."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from clif.errors import UserError, loading
from clif.eval import dc, protocols
from clif.eval.sources import check_open_clip_name


class Backbone:
    """An open_clip model ('ViT-B-32' + --clip_pretrained, 'hf-hub:org/repo' or 'local-dir:/path'), frozen."""

    def __init__(self, name: str, pretrained: str | None, device):
        import open_clip

        schema = name.split(":", 1)[0] if ":" in name else None
        if schema not in ("hf-hub", "local-dir"):
            check_open_clip_name(name)
        with loading("CLIP model", name, errors=(RuntimeError, OSError, ValueError)):
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if schema else pretrained, device=device
            )
            self.tokenizer = open_clip.get_tokenizer(name)
        self.model.eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        out = [
            self.model.encode_image(
                torch.stack([self.preprocess(im) for im in images[s : s + batch_size]]).to(self.device)
            )
            .double()
            .cpu()
            for s in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        return torch.cat(
            [
                self.model.encode_text(self.tokenizer(texts[s : s + batch_size]).to(self.device)).double().cpu()
                for s in range(0, len(texts), batch_size)
            ]
        )


@torch.no_grad()
def _image_features(processor, images: list[Image.Image], batch_size: int, device, forward) -> torch.Tensor:
    """`forward(pixel_values)` over `images` in batches (transformers processors), as float64 on the CPU."""
    out = []
    for s in range(0, len(images), batch_size):
        px = processor(images=images[s : s + batch_size], return_tensors="pt")["pixel_values"]
        out.append(forward(px.to(device)).double().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class TransformersCLIP:
    """A transformers CLIPModel folder (e.g. the toy world's `paired_clip/`) with the Backbone interface."""

    def __init__(self, path: str, device):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        with loading("CLIP model", path):
            self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
            self.processor = CLIPImageProcessor.from_pretrained(path)
            self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.device = device

    def images(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        return _image_features(
            self.processor,
            images,
            batch_size,
            self.device,
            lambda px: self.model.get_image_features(pixel_values=px).pooler_output,
        )

    @torch.no_grad()
    def texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), batch_size):
            ids = self.tokenizer(
                texts[s : s + batch_size], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            out.append(self.model.get_text_features(input_ids=ids).pooler_output.double().cpu())
        return torch.cat(out)


def open_backbone(name: str, pretrained: str | None, device):
    """`name` is a transformers CLIPModel folder (has config.json) or an open_clip name / hf-hub: / local-dir:."""
    if (Path(name) / "config.json").is_file():
        return TransformersCLIP(name, device)
    return Backbone(name, pretrained, device)


class Dino:
    """DINO image features (CLS token) from transformers, e.g. facebook/dino-vits16."""

    def __init__(self, name: str, device):
        from transformers import AutoImageProcessor, AutoModel

        with loading("DINO model", name):
            self.processor = AutoImageProcessor.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).to(device).eval()
        self.device = device

    def images(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        return _image_features(
            self.processor,
            images,
            batch_size,
            self.device,
            lambda px: self.model(pixel_values=px).last_hidden_state[:, 0],
        )


class Detector:
    """Open-vocabulary boxes (OWLv2 from transformers) for the class words of a prompt."""

    def __init__(self, name: str, device, threshold: float = 0.1):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        with loading("detector", name):
            self.processor = Owlv2Processor.from_pretrained(name)
            self.model = Owlv2ForObjectDetection.from_pretrained(name).to(device).eval()
        self.device, self.threshold = device, threshold

    @torch.no_grad()
    def two_boxes(self, image: Image.Image, words: list[str]) -> list[tuple[int, int, int, int]]:
        """Up to two non-overlapping boxes, best first, for any of `words`."""
        from torchvision.ops import box_iou

        inputs = self.processor(text=[[f"a photo of a {w}" for w in words]], images=image, return_tensors="pt")
        out = self.model(**inputs.to(self.device))
        side = max(image.size)  # OWLv2 pads to a square
        res = self.processor.image_processor.post_process_object_detection(
            out, threshold=self.threshold, target_sizes=torch.tensor([[side, side]])
        )[0]
        chosen: list[torch.Tensor] = []
        w, h = image.size
        for i in res["scores"].argsort(descending=True):
            box = res["boxes"][i].cpu().clamp(min=0)
            box = torch.stack([box[0].clamp(max=w), box[1].clamp(max=h), box[2].clamp(max=w), box[3].clamp(max=h)])
            if box[2] - box[0] < 4 or box[3] - box[1] < 4:  # degenerate (or outside the image, in the padding)
                continue
            if all(box_iou(box[None], c[None]).item() < 0.5 for c in chosen):
                chosen.append(box)
            if len(chosen) == 2:
                break
        return [tuple(int(v) for v in b.tolist()) for b in chosen]


def open_models(args, metrics: set[str], proto: dict | None, device):
    """(D&C model or None, CLIP backbone, DINO or None, detector or None), opened once sources.check passed; with a
    protocol, its CLIP transform and DINO. The D&C model first: a bad --dc_model fails before other loads print."""
    dc_model = dc.open_dc_model(args.dc_model, device) if "dc" in metrics else None
    backbone = open_backbone(args.clip_model, args.clip_pretrained, device)
    if proto is not None:
        if not isinstance(backbone, Backbone):
            raise UserError(f"--protocol {args.protocol} needs an open_clip model")
        backbone.preprocess = protocols.clip_transform(proto)
        dino = protocols.CDDino(args.dino, device, proto["dino_resize"], proto["dino_crop"])
    else:
        dino = Dino(args.dino, device) if args.dino else None
    detector = None if args.detector == "none" else Detector(args.detector, device, args.detector_threshold)
    return dc_model, backbone, dino, detector
