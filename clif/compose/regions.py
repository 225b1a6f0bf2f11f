"""Region boxes: parsed and checked from the command line, and as per-pixel weights at every attention resolution."""

from __future__ import annotations

import math

import torch

from clif.errors import UserError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image width and height


def parse_box(spec: str) -> tuple[str, Box]:
    """'<token>=x0,y0,x1,y1' (fractions of the image, x to the right, y down) -> (token, box); UserError otherwise."""
    token, eq, rest = spec.partition("=")
    if not eq or not token.strip():
        raise UserError(
            f"--region_box {spec!r}: write TOKEN=x0,y0,x1,y1 (fractions of the image), e.g. '<a>=0,0,0.5,1'"
        )
    parts = rest.split(",")
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise UserError(f"--region_box {spec!r}: the box must be four numbers x0,y0,x1,y1 (fractions of the image)")
    if not all(0.0 <= v <= 1.0 for v in box):
        raise UserError(f"--region_box {spec!r}: every coordinate must lie in [0, 1] (fractions of the image)")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"--region_box {spec!r}: the box has no area (x1 must exceed x0 and y1 exceed y0)")
    return token.strip(), box  # type: ignore[return-value]


def parse_boxes(specs: list[str]) -> dict[str, Box]:
    boxes: dict[str, Box] = {}
    for spec in specs:
        token, box = parse_box(spec)
        if token in boxes:
            raise UserError(f"--region_box: {token} is given two boxes")
        boxes[token] = box
    return boxes


def box_mask(box: Box, h: int, w: int) -> torch.Tensor:
    """[h, w] float mask of the cells whose centre lies inside `box` (at least the cell under the box's centre, so a
    small box still has a cell at a coarse resolution)."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    m = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    if not m.any():
        m[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)] = True
    return m.float()


def region_weights(boxes: list[Box], h: int, w: int, overlap: str = "mean") -> torch.Tensor:
    """[R + 1, h * w] weights: how much each cell takes from each region's prompt (rows 0..R-1) and from the global
    prompt (row R); every column sums to 1. Outside every box: the global prompt. Where boxes overlap: 'mean' shares
    the cell among them, 'global' gives it to the global prompt."""
    return combine(torch.stack([box_mask(b, h, w).flatten() for b in boxes]), overlap)


def combine(m: torch.Tensor, overlap: str = "mean") -> torch.Tensor:
    """Region masks [..., R, n] (in [0, 1]) -> weights [..., R + 1, n] as region_weights describes."""
    cover = m.sum(-2, keepdim=True)
    m = m * (cover <= 1) if overlap == "global" else m / cover.clamp_min(1)
    return torch.cat([m, (1 - m.sum(-2, keepdim=True)).clamp_min(0)], -2)


def masks_from_maps(maps: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """Region masks [B, C, H, W] from the concepts' attention maps [B, C, H, W]: each pixel goes to the concept
    whose map (scaled to its own maximum in that image) is highest there, unless that is below `threshold` (the
    pixel then reads the global prompt)."""
    scaled = maps / maps.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
    best, who = scaled.max(1)
    one_hot = torch.nn.functional.one_hot(who, maps.shape[1]).permute(0, 3, 1, 2).float()
    return one_hot * (best >= threshold)[:, None].float()


def mask_weights(masks: torch.Tensor, h: int, w: int, overlap: str = "mean") -> torch.Tensor:
    """[B, R + 1, h * w] weights of per-image region masks [B, R, H, W] at an attention grid of h x w cells."""
    m = torch.nn.functional.interpolate(masks.float(), size=(h, w), mode="area")
    return combine(m.flatten(2), overlap)


def grid_of(n: int, latent_hw: tuple[int, int], levels: int = 8) -> tuple[int, int]:
    """The (h, w) of an attention layer with `n` query tokens: the latent size halved (rounding up, as the UNet's
    stride-2 convolutions do) until it has n cells."""
    h, w = latent_hw
    for _ in range(levels):
        if h * w == n:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    raise ValueError(f"no attention resolution of a {latent_hw} latent has {n} cells")
