"""Text->image retrieval among concepts, from a similarity matrix: stage 1's confusion probe
(clif/contrastive/confusion.py) reports it; it sits below both the stages and the evaluation."""

from __future__ import annotations

import torch


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
