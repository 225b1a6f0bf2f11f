"""Isolated concept encoding: each concept's token states from an encoding where the other concepts are absent,
spliced into the full prompt's states with a weight (the text side's causal test: does the second concept's
pull toward the first come from the text encoder?). Runs through stock pipelines as `prompt_embeds`."""

from __future__ import annotations

import torch

BY = ("mask", "pad", "alone")  # how the other concepts are made absent
END = ("keep", "clean")  # the end (EOS and padding) states: as they are, or from the prompt without concept tokens


class Encoder:
    """A loaded pipeline's text side through the family seam: prompts -> (what the UNet reads, pooled embedding),
    concept tokens expanded as the pipeline expands them; the text encoders' LoRA at the scale generation uses."""

    def __init__(self, pipe, model, lora_scale: float | None = None):
        self.pipe, self.model, self.lora_scale = pipe, model, lora_scale

    def expand(self, prompt: str) -> str:
        return self.pipe.maybe_convert_prompt(prompt, self.model.tokenizers[0])

    def ids(self, prompts: list[str]) -> list[torch.Tensor]:
        return self.model.tokenize([self.expand(p) for p in prompts])

    @torch.no_grad()
    def encode(self, ids: list[torch.Tensor], attention_mask: torch.Tensor | None = None):
        from diffusers.utils import scale_lora_layers, unscale_lora_layers

        scale = self.lora_scale
        for enc in self.model.text_encoders if scale is not None else ():
            scale_lora_layers(enc, scale)
        try:
            return self.model.encode_prompt(ids, attention_mask)
        finally:
            for enc in self.model.text_encoders if scale is not None else ():
                unscale_lora_layers(enc, scale)

    def phrase_ids(self, text: str) -> list[int]:
        return self.model.tokenizers[0](self.expand(text), add_special_tokens=False).input_ids

    def positions(self, ids: torch.Tensor, token: str) -> list[int]:
        """Positions of every occurrence of `token` (all its vectors) in one row of first-tokenizer ids."""
        from .prompt import find_spans

        return [i for s in find_spans(ids.tolist(), self.phrase_ids(token)) for i in range(s.start, s.stop)]

    def eos(self, ids: torch.Tensor) -> int:
        eos = self.model.tokenizers[0].eos_token_id
        return next(i for i in range(1, len(ids)) if int(ids[i]) == eos)


def _without(ids: list[torch.Tensor], hidden: list[int]) -> torch.Tensor:
    mask = torch.ones_like(ids[0])
    mask[0, hidden] = 0
    return mask


def isolated(enc: Encoder, prompt: str, tokens: list[str], *, by: str, weight: float, end: str):
    """(prompt_embeds [1, T, D], pooled [1, D] or None, positions per token): the full prompt's states with each
    concept's positions replaced by `weight` of its isolated states ('mask': the others hidden by the text
    encoder's attention mask; 'pad': their ids replaced by the padding token; 'alone': the concept's states in
    'a <concept>'), and with end='clean' the end states from the prompt with every concept hidden. The pooled
    embedding stays the full prompt's."""
    ids = enc.ids([prompt])
    full, pooled = enc.encode(ids)
    pos = {t: enc.positions(ids[0][0], t) for t in tokens}
    out = full.clone()

    def mix(where: list[int], states: torch.Tensor) -> None:
        out[0, where] = (1 - weight) * full[0, where] + weight * states

    for t in tokens:
        others = [q for u in tokens if u != t for q in pos[u]]
        if not pos[t]:
            continue
        if by == "mask":
            mix(pos[t], enc.encode(ids, _without(ids, others))[0][0, pos[t]])
        elif by == "pad":
            padded = [x.clone() for x in ids]
            for x, tok in zip(padded, enc.model.tokenizers):
                x[0, others] = tok.pad_token_id
            mix(pos[t], enc.encode(padded)[0][0, pos[t]])
        else:
            alone = enc.ids([f"a {t}"])
            own = enc.positions(alone[0][0], t)
            states = enc.encode(alone)[0][0, own]
            mix(pos[t], states.repeat(len(pos[t]) // len(own), 1))
    if end == "clean":
        e = enc.eos(ids[0][0])
        every = [q for t in tokens for q in pos[t]]
        mix(list(range(e, out.shape[1])), enc.encode(ids, _without(ids, every))[0][0, e:])
    return out, pooled, pos
