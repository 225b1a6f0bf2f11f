"""One micro-step of stage 1: draw the global batch of pairs, encode this process's captions (in chunks), and
back-propagate the contrastive loss of the whole global batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from clif.contrastive.gradcache import cached_backward
from clif.contrastive.losses import clip_loss, gather_features
from clif.contrastive.text_side import TextSide
from clif.train.data import Shard
from clif.train.training import NoiseSource


@dataclass
class ContrastiveStep:
    """The pairs (captions, keys, frozen image features per paired CLIP) and how one micro-step uses them."""

    text: TextSide
    paired: list  # PairedCLIP per text encoder
    image_feats: list[torch.Tensor]  # per paired CLIP: [n_pairs, P], computed once
    captions: list[str]
    keys: list
    shard: Shard
    accelerator: object
    chunk: int | None  # --text_chunk_size

    def __call__(self, noise: NoiseSource, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Back-propagate one micro-batch through `backward`; returns its loss (detached), for the log.

        The global batch is drawn once for all processes from the noise stream; each process encodes its shard of
        the captions, in chunks of `chunk`, with the gradient of the whole global batch's loss."""
        sh, device = self.shard, self.accelerator.device
        idx = torch.randint(len(self.captions), (sh.global_batch,), generator=noise.gen, device=noise.device).cpu()
        local = [self.captions[i] for i in idx[sh.rank * sh.local : (sh.rank + 1) * sh.local]]
        batch_keys = [self.keys[i] for i in idx]

        # every process holds the full global loss but only its shard's gradient: scale so the averaged
        # gradients equal those of one process with the whole batch
        def loss_of(feats: list[torch.Tensor]) -> torch.Tensor:
            return sh.world * sum(
                clip_loss(gather_features(f, self.accelerator), img[idx].to(device), batch_keys, p.logit_scale)
                for f, img, p in zip(feats, self.image_feats, self.paired)
            )

        loss = cached_backward(lambda s: self.text.features(local[s]), len(local), self.chunk, loss_of, backward)
        return loss / sh.world
