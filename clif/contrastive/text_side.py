"""Stage 1's text side: captions -> projected text features through each (text encoder, paired CLIP) of the family."""

from __future__ import annotations

import torch

from clif.concepts import Concept
from clif.tokens import expand_prompt


class TextSide:
    """Caption -> projected text features through each (text encoder, paired CLIP) of the family."""

    def __init__(self, model, paired: list, concepts: list[Concept]):
        self.model, self.paired, self.concepts = model, paired, concepts

    def features(self, captions: list[str]) -> list[torch.Tensor]:
        """One [len(captions), P] tensor per encoder (with grad when grad is enabled)."""
        ids = self.model.tokenize([expand_prompt(c, self.concepts) for c in captions])
        out = []
        for p, enc, i, tok in zip(self.paired, self.model.text_encoders, ids, self.model.tokenizers):
            # causal attention: positions after the batch's last EOS cannot change the pooled output, and
            # captions are ~15 of the 77 positions, so dropping them is ~5x less text-encoder work
            last = int((i == tok.eos_token_id).int().argmax(dim=-1).max()) + 1
            out.append(p.text_features(enc, i[:, :last], tok.eos_token_id))
        return out
