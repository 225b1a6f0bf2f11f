"""The paper's metrics (as Custom Diffusion computes them) and CLIF's confusion metric, on given features."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F


def clip_score(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair (CLIPScore = 2.5 * max(cos, 0), raw cosine) of matching image/text rows."""
    cos = (F.normalize(image.double(), dim=-1) * F.normalize(text.double(), dim=-1)).sum(-1)
    return 2.5 * cos.clamp(min=0), cos


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row mean cosine of each row of `a` against all rows of `b` (image alignment)."""
    return (F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).mean(dim=1)


def replace_tokens(prompt: str, tokens: dict[str, str]) -> str:
    """Each placeholder token (and its _i vectors) replaced by its class word."""
    for token, word in tokens.items():
        t = re.escape(token)
        # an expanded multi-vector token ("<t> <t>_1") is one concept: one class word
        prompt = re.sub(t + r"(?:_\d+)?(?:\s+" + t + r"_\d+)*", word, prompt)
    return re.sub(r"\s+", " ", prompt).strip()


def tokens_in(prompt: str, tokens: list[str]) -> list[str]:
    """Placeholder tokens named in `prompt`, in order of appearance (left concept first for left/right prompts)."""
    found = sorted((prompt.find(t), t) for t in tokens if t in prompt)
    order = [t for _, t in found]
    left = prompt.find("on the left")
    if left >= 0 and len(order) == 2 and "on the right" in prompt:
        # the token closest before "on the left" is the left one
        before = [t for t in order if 0 <= prompt.find(t) < left]
        if before and before[-1] != order[0]:
            order = [before[-1]] + [t for t in order if t != before[-1]]
    return order


def says_left_right(prompt: str) -> bool:
    return "on the left" in prompt and "on the right" in prompt


def confusion_decision(sims: torch.Tensor | None, margin: float) -> tuple[bool, bool]:
    """(both found, confused) for one two-concept image.

    `sims[k, c]` = similarity of found instance k (2 of them) to the references of concept c (the prompt's two
    concepts). None = fewer than two instances were found. Confused when both instances match the same concept,
    or when an instance matches neither clearly (best minus other < margin).
    """
    if sims is None:
        return False, False
    best = sims.argmax(dim=1)
    gap = sims.max(dim=1).values - sims.min(dim=1).values
    return True, bool(best[0] == best[1] or (gap < margin).any())
