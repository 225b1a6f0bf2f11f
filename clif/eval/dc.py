"""Detect-and-Compare (D&C), MuDI's identity-mixing metric (Jang et al., NeurIPS 2024), written for CLIF.

Read at the source (github.com/agwmon/MuDI, commit 5a23703): `detect_and_compare/owl_dreamsim_utils.py`
(detection, crop and padding, DINOv2 / DreamSim features) and `detect_and_compare/demo.ipynb` (the matrices,
the row ordering, the norm). What this module follows, choice by choice:

- Detection: OWLv2 (`google/owlv2-base-patch16-ensemble`) queried with each subject's class word as-is (no
  "a photo of" prefix); every box above the threshold is kept, whatever query it matched, and no NMS is
  applied (as `detect_and_crop`). The demo scores with threshold 0.4 (`--dc_threshold`, default 0.4).
  One deliberate difference: MuDI scales boxes by the image's (height, width); OWLv2 pads the image to a square
  before predicting, so we scale by the longer side (identical for square images, right for the others).
- Crops: each box cropped and pasted centred on a white square of its longer side (`crop_and_pad_image`).
- Features: DINOv2 `facebook/dinov2-base` through transformers' AutoImageProcessor / Dinov2Model, the mean of
  the last hidden state over all tokens, CLS included (`eval_with_dinov2`), or DreamSim's `embed` when the
  `dreamsim` package is installed (`eval_with_dreamsim`, the demo's default).
- S_DC[box, subject] = mean cosine of the crop to that subject's reference images (`gt_distance`: the mean of
  the per-reference similarities); rows reordered greedily: for column i in turn, the unused row with the
  largest value in column i becomes row i (`sort_by_max`; ties go to the first row).
- S_GT[i, j] = mean cosine between reference sets i and j; the diagonal includes the self-pairs (cos = 1)
  (`get_gt_matrix`).
- D&C = 1 - ||S_DC - S_GT||_2, the spectral norm (`np.linalg.norm(..., ord=2)` in the demo); a box count
  different from the subject count gives distance 1, i.e. D&C = 0 (`gt_distance`). Not clipped: a very
  wrong matrix can score below 0, as in MuDI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from clif.concepts import open_rgb

DEFAULT_THRESHOLD = 0.4  # MuDI demo.ipynb: evalulator.score(..., threshold=0.4)
DEFAULT_MODEL = "facebook/dinov2-base"  # MuDI owl_dreamsim_utils.eval_with_dinov2

Box = tuple[float, float, float, float]


def pad_to_white_square(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The box's crop, centred on a white square whose side is the crop's longer side."""
    crop = image.convert("RGB").crop(tuple(box))
    side = max(crop.size)
    out = Image.new("RGB", (side, side), (255, 255, 255))
    out.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def gt_matrix(refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """S_GT[i, j]: mean cosine between all references of subject i and all of subject j (self-pairs included)."""
    n = len(refs)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[i, j] = (_unit(refs[i]) @ _unit(refs[j]).T).mean()
    return out


def dc_matrix(crops: torch.Tensor, refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """S_DC[k, j]: mean cosine of crop k's features to subject j's reference features (rows in box order)."""
    return torch.stack([(_unit(crops) @ _unit(r).T).mean(dim=1) for r in refs], dim=1)


def order_rows(s: torch.Tensor) -> torch.Tensor:
    """Greedy by column maximum: for column i in turn, the unused row with the largest value there is row i."""
    used: list[int] = []
    for i in range(s.shape[1]):
        free = [k for k in range(s.shape[0]) if k not in used]
        used.append(max(free, key=lambda k: (s[k, i].item(), -k)))  # ties: the first row, as MuDI's strict '>'
    return s[used]


def dc_score(s_dc: torch.Tensor, s_gt: torch.Tensor) -> float:
    """1 - spectral norm of (ordered S_DC - S_GT); 0 when the box count differs from the subject count."""
    if s_dc.shape[0] != s_gt.shape[0]:
        return 0.0
    diff = order_rows(s_dc.double()) - s_gt.double()
    return 1.0 - float(torch.linalg.matrix_norm(diff, ord=2))


def dc_of_crops(
    crops: list[Image.Image], refs: Sequence[torch.Tensor], embed: Callable[[list[Image.Image]], torch.Tensor]
) -> dict:
    """D&C of given crops (detector boxes, or the two image halves in the toy world) against reference features.

    `embed(images) -> [n, d]` is any image-feature model; `refs[j]` are subject j's reference features from
    the same model. Returns {"dc", "boxes": count, "matrix": ordered S_DC or None, "gt": S_GT}.
    """
    s_gt = gt_matrix(refs)
    if len(crops) != len(refs):
        return {"dc": 0.0, "boxes": len(crops), "matrix": None, "gt": s_gt.tolist()}
    s_dc = dc_matrix(embed(crops), refs)
    return {"dc": dc_score(s_dc, s_gt), "boxes": len(crops), "matrix": order_rows(s_dc).tolist(), "gt": s_gt.tolist()}


@torch.no_grad()
def detect_boxes(detector, image: Image.Image, queries: list[str], threshold: float) -> list[Box]:
    """Every OWLv2 box scoring above `threshold` for any of `queries` (MuDI: raw class words, no NMS).

    `detector` has `.processor` (Owlv2Processor), `.model` (Owlv2ForObjectDetection) and `.device`, as
    `clif.eval.backbones.Detector`. Boxes are clamped to the image; empty ones (in OWLv2's padding) are dropped.
    """
    image = image.convert("RGB")
    inputs = detector.processor(text=[list(queries)], images=image, return_tensors="pt")
    out = detector.model(**inputs.to(detector.device))
    side = max(image.size)  # OWLv2 predicts on the image padded to a square (bottom / right)
    res = detector.processor.image_processor.post_process_object_detection(
        out, threshold=threshold, target_sizes=torch.tensor([[side, side]])
    )[0]
    w, h = image.size
    boxes = []
    for b in res["boxes"].cpu().tolist():
        x0, y0, x1, y1 = max(0.0, b[0]), max(0.0, b[1]), min(float(w), b[2]), min(float(h), b[3])
        if x1 - x0 >= 1 and y1 - y0 >= 1:
            boxes.append((x0, y0, x1, y1))
    return boxes


class Dinov2Features:
    """DINOv2 image features as MuDI computes them: processor defaults, mean of the last hidden state."""

    def __init__(self, name: str, device):
        from transformers import AutoImageProcessor, AutoModel

        from clif.errors import loading

        with loading("D&C feature model", name):
            self.processor = AutoImageProcessor.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).to(device).eval().requires_grad_(False)
        self.device, self.name = device, name

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        out = []
        for s in range(0, len(images), batch_size):
            px = self.processor(images=images[s : s + batch_size], return_tensors="pt")["pixel_values"]
            out.append(self.model(pixel_values=px.to(self.device)).last_hidden_state.mean(dim=1).double().cpu())
        return torch.cat(out) if out else torch.zeros(0)


class DreamSimFeatures:
    """DreamSim's embedding (MuDI's default D&C model); needs the optional `dreamsim` package and its weights."""

    def __init__(self, device, cache_dir: str | None = None):
        from clif.errors import UserError, loading

        try:
            from dreamsim import dreamsim
        except ImportError:
            raise UserError("--dc_model dreamsim needs the 'dreamsim' package (pip install dreamsim)") from None
        with loading("D&C feature model", "dreamsim", errors=(OSError, ValueError, RuntimeError)):
            self.model, self.preprocess = dreamsim(pretrained=True, device=device, cache_dir=cache_dir or "./models")
        self.device, self.name = device, "dreamsim"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        return torch.cat([self.model.embed(self.preprocess(im).to(self.device)).double().cpu() for im in images])


def open_dc_model(name: str, device):
    """'dreamsim' (the optional package) or a transformers DINOv2 model id / folder."""
    return DreamSimFeatures(device) if name == "dreamsim" else Dinov2Features(name, device)


def score_image(
    image: Image.Image,
    subjects: list[str],
    class_words: list[str],
    refs: dict[str, torch.Tensor],
    embed: Callable[[list[Image.Image]], torch.Tensor],
    detector,
    threshold: float,
) -> dict:
    """D&C of one generated image naming `subjects` (in prompt order); refs[name] = reference features."""
    boxes = detect_boxes(detector, image, class_words, threshold)
    res = dc_of_crops([pad_to_white_square(image, b) for b in boxes], [refs[s] for s in subjects], embed)
    res["box_list"] = [[round(v, 1) for v in b] for b in boxes]
    return res


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def dc_stats(rows: list[dict]) -> dict:
    """{"dc": mean D&C, "dc_zero_share": share of images scored 0 for a wrong box count, "dc_images": n}."""
    scored = [r for r in rows if "dc" in r]
    if not scored:
        return {}
    return {
        "dc": _mean([r["dc"] for r in scored]),
        "dc_zero_share": sum(r["dc_boxes"] != len(r["concepts"]) for r in scored) / len(scored),
        "dc_images": len(scored),
    }


def per_pair(rows: list[dict]) -> list[dict]:
    """D&C and CLIF confusion grouped by the (sorted) concepts an image's prompt names, for multi-concept rows."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for r in rows:
        if len(r["concepts"]) >= 2:
            groups.setdefault(tuple(sorted(r["concepts"])), []).append(r)
    out = []
    for pair, rs in sorted(groups.items()):
        found = [r for r in rs if r.get("found")]
        entry = {"pair": list(pair), "images": len(rs), **dc_stats(rs)}
        entry["attendance"] = len(found) / len(rs) if any("found" in r for r in rs) else None
        entry["confusion_rate"] = sum(r["confused"] for r in found) / len(found) if found else None
        out.append(entry)
    return out


def add_to_rows(rows: list[dict], items, concepts, refs, embed, detector, threshold: float) -> None:
    """D&C per multi-concept image of a scored folder, in place: row["dc"], ["dc_boxes"], ["dc_box_list"],
    ["dc_matrix"]. `items` are the folder's images (paths) in the order of `rows`."""
    by_name = {c.name: c for c in concepts}
    for row, it in zip(rows, items):
        if len(row["concepts"]) < 2:
            continue
        res = score_image(
            open_rgb(it.path),
            row["concepts"],
            [by_name[n].class_word for n in row["concepts"]],
            refs,
            embed,
            detector,
            threshold,
        )
        row.update(dc=res["dc"], dc_boxes=res["boxes"], dc_box_list=res["box_list"], dc_matrix=res["matrix"])
