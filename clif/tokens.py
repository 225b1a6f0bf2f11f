"""Placeholder tokens: adding them to the tokenizers, and training only their embedding rows."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from clif.concepts import Concept
from clif.errors import UserError


class ConceptEmbedding(nn.Module):
    """Token embedding = the frozen vocabulary table plus a small trainable fp32 table for the new tokens.

    Ids >= `base_rows` read the trainable table. The frozen table never receives a gradient, so every
    other row stays bit-identical, and the optimizer holds state for the new rows only.
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.base_rows = base.weight.shape[0]
        self.new = nn.Parameter(new_rows.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The full table (used by code that reads `get_input_embeddings().weight`)."""
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.base_rows - 1))
        is_new = ids >= self.base_rows
        if not bool(is_new.any()):
            return out
        extra = F.embedding((ids - self.base_rows).clamp(min=0), self.new).to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), extra, out)


def known_tokens(tokenizer, words: list[str]) -> list[str]:
    """The `words` already in the tokenizer's vocabulary (case-insensitively, as CLIP lowercases)."""
    vocab = tokenizer.get_vocab()
    return [t for t in words if t in vocab or t.lower() in vocab]


def check_vocabulary(tokenizers: list, concepts: list[Concept]) -> None:
    """Each initializer is one token and no placeholder token is already a word of the tokenizers."""
    for c in concepts:
        for tok in tokenizers:
            ids = tok.encode(c.initializer, add_special_tokens=False)
            if len(ids) != 1:
                raise UserError(
                    f"concept {c.name!r}: initializer {c.initializer!r} is {len(ids)} tokens, need exactly 1"
                )
            clash = known_tokens(tok, c.tokens)
            if clash:
                raise UserError(
                    f"concept {c.name!r}: token {clash[0]!r} is already in the tokenizer's vocabulary; "
                    "choose another token"
                )


def word_names(tokenizer, concepts: list[Concept]) -> list[str]:
    """Concept names that are a single existing token of the base tokenizer (e.g. 'cat'). A1111, ComfyUI and kohya
    take an embedding file's stem as its trigger word: such a name shadows the real word there, and kohya's loader
    refuses it ("token ids1 is not ordered")."""
    return [c.name for c in concepts if len(tokenizer.encode(c.name, add_special_tokens=False)) == 1]


def check_word_names(tokenizer, concepts: list[Concept], *, allow: bool) -> None:
    """Refuse (one line) concept names that are words of the base tokenizer; with `allow`, warn once on stderr."""
    words = word_names(tokenizer, concepts)
    if not words:
        return
    what = (
        f"concept name(s) {', '.join(map(repr, words))} are words of the base model's tokenizer: A1111, ComfyUI and "
        f"kohya take embeddings/{words[0]}.safetensors's name as its trigger word, which would shadow the word "
        "(kohya refuses the file)"
    )
    if not allow:
        raise UserError(f"{what}; rename the concept (e.g. {words[0]}1), or pass --allow_word_names")
    import sys

    sys.stderr.write(f"warning: {what}\n")


def add_placeholder_tokens(tokenizers: list, concepts: list[Concept]) -> list[list[int]]:
    """Add every concept's tokens to each tokenizer; returns the ids of each concept (same in all tokenizers)."""
    check_vocabulary(tokenizers, concepts)
    ids_per_concept: list[list[int]] = []
    for c in concepts:
        per_tok = []
        for tok in tokenizers:
            tok.add_tokens(c.tokens)
            per_tok.append(tok.convert_tokens_to_ids(c.tokens))
        if any(p != per_tok[0] for p in per_tok):
            raise RuntimeError("tokenizers assigned different ids to the same placeholder tokens")
        ids_per_concept.append(per_tok[0])
    return ids_per_concept


def initializer_rows(tokenizer, encoder, concept: Concept) -> torch.Tensor:
    """[num_vectors, D] copies of the initializer word's embedding row."""
    (wid,) = tokenizer.encode(concept.initializer, add_special_tokens=False)
    row = encoder.get_input_embeddings().weight[wid].detach().float()
    return row.unsqueeze(0).repeat(concept.num_vectors, 1)


def install(encoders: list, rows_per_encoder: list[list[torch.Tensor]], first_new_id: int) -> list[ConceptEmbedding]:
    """Swap each encoder's token embedding for a ConceptEmbedding holding the concepts' rows (in id order)."""
    modules = []
    for enc, rows in zip(encoders, rows_per_encoder):
        base = enc.get_input_embeddings()
        if base.weight.shape[0] != first_new_id:
            raise RuntimeError(f"tokenizer has {first_new_id} ids but the encoder table {base.weight.shape[0]} rows")
        module = ConceptEmbedding(base, torch.cat(rows).to(base.weight.device))
        enc.set_input_embeddings(module)
        modules.append(module)
    return modules


def concept_rows(module: ConceptEmbedding, concept_index: int, concepts: list[Concept]) -> torch.Tensor:
    """The current [num_vectors, D] rows of one concept inside a ConceptEmbedding."""
    start = sum(c.num_vectors for c in concepts[:concept_index])
    return module.new[start : start + concepts[concept_index].num_vectors]


def expand_prompt(prompt: str, concepts: list[Concept]) -> str:
    """Write each placeholder token as all its vectors' tokens, as diffusers' maybe_convert_prompt does."""
    for c in concepts:
        if c.num_vectors > 1:
            prompt = re.sub(re.escape(c.token) + r"(?![_\w])", " ".join(c.tokens), prompt)
    return prompt
