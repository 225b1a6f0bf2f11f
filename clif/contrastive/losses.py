"""Stage-1 contrastive loss: CLIP InfoNCE with multi-positive targets, features gathered across processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_features(x: torch.Tensor, accelerator) -> torch.Tensor:
    """All processes' rows, in process order; only the local shard keeps its gradient (open_clip's scheme)."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    gathered = list(accelerator.gather(x.detach()).chunk(accelerator.num_processes))
    gathered[accelerator.process_index] = x
    return torch.cat(gathered)


def multi_positive_targets(keys: list, device) -> torch.Tensor:
    """Row-normalised target matrix: every pair with an equal key (what the caption names) is a positive."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(keys))}
    labels = torch.tensor([ids[c] for c in keys], device=device)
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def clip_loss(text: torch.Tensor, image: torch.Tensor, keys: list, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features; soft targets so pairs naming the same thing (equal `keys`,
    e.g. two templates around one token) are not pushed apart."""
    text = F.normalize(text.float(), dim=-1)
    image = F.normalize(image.float(), dim=-1)
    logits = logit_scale * text @ image.T
    targets = multi_positive_targets(keys, text.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
