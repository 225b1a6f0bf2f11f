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


def multi_positive_targets(captions: list[str], device) -> torch.Tensor:
    """Row-normalised target matrix: every pair with an identical caption is a positive."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions], device=device)
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def clip_loss(text: torch.Tensor, image: torch.Tensor, captions: list[str], logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features; soft targets so identical captions are not pushed apart."""
    text = F.normalize(text.float(), dim=-1)
    image = F.normalize(image.float(), dim=-1)
    logits = logit_scale * text @ image.T
    targets = multi_positive_targets(captions, text.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def retrieval_matrix(sims: torch.Tensor, image_concept: torch.Tensor, n: int) -> tuple[float, list]:
    """Text->image retrieval among concepts from similarities [n texts, N images]: row i = share of
    concept j's views in text i's top-k images, k = the number of views of concept i.

    Accuracy = mean of the diagonal (chance = 1/n for balanced views).
    """
    sims = sims.float().cpu()
    image_concept = image_concept.cpu()
    matrix = torch.zeros(n, n)
    for i in range(n):
        k = int((image_concept == i).sum())
        top = sims[i].topk(k).indices
        for j in range(n):
            matrix[i, j] = (image_concept[top] == j).float().mean()
    return float(matrix.diag().mean()), matrix.tolist()
