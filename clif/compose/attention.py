"""The cross-attention processor of composition: regional prompts (each region's pixels read that region's prompt
states, on the conditional half of the guidance batch), the attention-bias variant (a concept's tokens hidden inside
the other concepts' regions, as Cones 2 does), and the attention-map recorder. Inactive, it calls the UNet's own
processor with the same arguments, so plain generation is unchanged bit for bit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .regions import Box, grid_of, mask_weights, masks_from_maps, region_weights


@dataclass
class ComposeState:
    """What the processors of one pipeline call read (set per call by the plan) and what they record."""

    latent_hw: tuple[int, int] = (0, 0)
    n_images: int = 0  # images in the call: the last n_images rows of a batch are the conditional ones
    boxes: list[Box] = field(default_factory=list)
    region_states: torch.Tensor | None = None  # [R, T, D] ('prompt' mode)
    mode: str = "prompt"  # 'prompt' | 'bias'
    hidden: list[list[int]] = field(default_factory=list)  # 'bias': per region, the global tokens hidden there
    overlap: str = "mean"
    strength: float = 1.0
    window: tuple[int, int] = (0, 0)  # regions act on steps [start, end)
    step: int = 0
    # attention maps: per concept, its token positions in the global prompt and in each region prompt
    record: list[tuple[list[int], list[list[int]]]] | None = None
    masks: torch.Tensor | None = None  # [B, R, H, W] per-image regions (from the attention maps) instead of boxes
    maps: torch.Tensor | None = None  # [B, concepts, H, W], summed over layers and steps
    calls: int = 0
    _weights: dict = field(default_factory=dict)  # per call: weights and biases by resolution

    @property
    def regional(self) -> bool:
        return (bool(self.boxes) or self.masks is not None) and self.window[0] <= self.step < self.window[1]

    def regions_from_maps(self, threshold: float = 0.3) -> None:
        """Per-image regions from the maps recorded so far (each concept where its own tokens are attended to)."""
        self.masks, self._weights = masks_from_maps(self.maps), {}

    def weights(self, n: int, device, dtype) -> torch.Tensor:
        """[1 or B, R + 1, n] region weights at the resolution with n cells, made once per call, on the device."""
        key = ("w", n, device, dtype)
        if key not in self._weights:
            h, w = grid_of(n, self.latent_hw)
            if self.masks is not None:
                weights = mask_weights(self.masks, h, w, self.overlap)
            else:
                weights = region_weights(self.boxes, h, w, self.overlap)[None]
            self._weights[key] = weights.to(device, dtype)
        return self._weights[key]

    def bias(self, n: int, t: int, device, dtype) -> torch.Tensor:
        """[n, t] additive bias: -inf-like where a region's pixels meet the tokens hidden from that region."""
        key = ("b", n, t, device, dtype)
        if key not in self._weights:
            inside = self.weights(n, "cpu", torch.float32)[0, :-1] > 0  # [R, n]
            b = torch.zeros(n, t, dtype=torch.bool)
            for r, toks in enumerate(self.hidden):
                b[inside[r, :, None] & torch.isin(torch.arange(t), torch.tensor(toks, dtype=torch.long))[None]] = True
            self._weights[key] = torch.zeros(n, t, dtype=dtype).masked_fill(b, torch.finfo(dtype).min).to(device)
        return self._weights[key]


class ComposeProcessor:
    """Wraps a UNet cross-attention processor (`attn2`); everything not composed goes to `base` unchanged."""

    def __init__(self, base, state: ComposeState):
        self.base, self.state = base, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        st = self.state
        plain = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is None or hidden_states.ndim != 3 or not (st.regional or st.record is not None):
            return plain
        rows, n, _ = hidden_states.shape
        b = st.n_images
        cond, e_cond = hidden_states[rows - b :], encoder_hidden_states[rows - b :]
        out = plain[rows - b :]
        weights = bias = region_out = None
        if st.regional:
            weights = st.weights(n, out.device, out.dtype)  # [1 or B, R + 1, n]
            if st.mode == "bias":
                bias = st.bias(n, e_cond.shape[1], out.device, out.dtype)
                composed = self.base(attn, cond, e_cond, bias.expand(b, -1, -1), temb)
            else:
                r = st.region_states.shape[0]
                e = st.region_states.to(e_cond.dtype).repeat_interleave(b, 0)  # [R * B, T, D], region-major
                region_out = self.base(attn, cond.repeat(r, 1, 1), e, None, temb).view(r, b, n, -1)
                wr = weights[:, :r].transpose(0, 1)[..., None]  # [R, 1 or B, n, 1]
                composed = (wr * region_out).sum(0) + weights[:, r, :, None] * out
            out = out + st.strength * (composed - out)
        if st.record is not None:
            self._record(attn, cond, e_cond, weights, bias)
        return torch.cat([plain[: rows - b], out]) if rows > b else out

    @torch.no_grad()
    def _record(self, attn, cond, e_cond, weights, bias) -> None:
        """Add this layer's attention mass on each concept's tokens, per pixel, to the state's maps."""
        st = self.state
        b, n, _ = cond.shape
        h, w = grid_of(n, st.latent_hw)

        def mass(e: torch.Tensor, positions: list[list[int]], bias=None) -> torch.Tensor:  # -> [B, concepts, n]
            q = attn.to_q(cond).view(b, n, attn.heads, -1).transpose(1, 2)
            k = attn.to_k(e).view(e.shape[0], e.shape[1], attn.heads, -1).transpose(1, 2)
            logits = (q @ k.transpose(-1, -2)) * attn.scale
            if bias is not None:
                logits = logits + bias[None, None].float()
            p = logits.float().softmax(-1).mean(1)  # [B, n, T]
            return torch.stack([p[..., pos].sum(-1) if pos else p[..., 0] * 0 for pos in positions], 1)

        glob = mass(e_cond, [g for g, _ in st.record], bias)
        if weights is not None and st.mode == "prompt" and st.regional:
            total = weights[:, None, -1].float() * glob
            for r in range(st.region_states.shape[0]):
                e = st.region_states[r : r + 1].to(e_cond.dtype).expand(b, -1, -1)
                total = total + weights[:, None, r].float() * mass(e, [reg[r] for _, reg in st.record])
            glob = total
        m = F.interpolate(glob.view(b, -1, h, w), size=st.latent_hw, mode="bilinear", align_corners=False)
        st.maps = m if st.maps is None else st.maps + m
        st.calls += 1


def install(unet, state: ComposeState) -> None:
    """Wrap every cross-attention processor of `unet` (once); other processors stay as they are."""
    procs = unet.attn_processors
    if any(isinstance(p, ComposeProcessor) for p in procs.values()):
        for p in procs.values():
            if isinstance(p, ComposeProcessor):
                p.state = state
        return
    unet.set_attn_processor(
        {k: ComposeProcessor(p, state) if k.endswith("attn2.processor") else p for k, p in procs.items()}
    )
