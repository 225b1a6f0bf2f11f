"""Gradient-cached contrastive backward (Gao et al. 2021, "GradCache"): the full batch's loss and gradient, while the
text encoder only ever holds the activations of one chunk. The image side is frozen, so only text needs this."""

from __future__ import annotations

from collections.abc import Callable

import torch

Features = list[torch.Tensor]  # one [n, P] tensor per encoder of the family


def cached_backward(
    encode: Callable[[slice], Features],
    n: int,
    chunk: int | None,
    loss_of: Callable[[Features], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
) -> torch.Tensor:
    """Backward of `loss_of(encode(0:n))` in chunks of `chunk` rows; returns the loss (detached).

    1. all features without grad, 2. the loss and its gradient w.r.t. the features, 3. each chunk again with
    grad, back-propagating <features, cached gradient> (same parameter gradient: the chain rule, chunk by chunk).
    """
    if chunk is None or chunk >= n:  # one pass: nothing to save, keep the plain graph
        loss = loss_of(encode(slice(0, n)))
        backward(loss)
        return loss.detach()
    slices = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    with torch.no_grad():
        parts = [encode(s) for s in slices]
    feats = [torch.cat([p[e] for p in parts]).detach().requires_grad_() for e in range(len(parts[0]))]
    loss = loss_of(feats)
    grads = torch.autograd.grad(loss, feats)
    for s in slices:
        out = encode(s)
        backward(sum((o.float() * g[s]).sum() for o, g in zip(out, grads)))
    return loss.detach()
