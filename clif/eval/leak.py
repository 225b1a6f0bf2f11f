"""The text-side leak probe: in a two-concept prompt, how far do the second concept's token states (what the UNet
cross-attends to) move from their single-concept values toward the first concept's?

For concepts A (named first) and B, with h(X | prompt) the mean of the UNet-read hidden states over X's tokens:

    leak(B <- A) = < h(B | pair) - h(B | single), h(A | single) - h(B | single) > / |h(A | single) - h(B | single)|^2

0: B's states in the pair sit where they sit alone (apart from moves orthogonal to A); 1: they sit on A's. The
single prompt is "a {}" and the pair prompts are the two-concept templates with A first. The same measure on the
concepts' plain words ("a red ball", "a blue box") is the reference of a text encoder that binds correctly.

`python -m clif.eval.leak --base MODEL [--stage_dir DIR ...] --words a="red ball" b="blue box" --out leak.json`
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

SINGLE = "a {}"
PAIR_TEMPLATES = (
    "a photo of a {0} on the left and a {1} on the right",
    "a {0} on the left and a {1} on the right",
    "a {0} and a {1}",
)
# encode(prompts) -> (hidden states [N, T, D], token ids [N, T] of the first tokenizer)
Encode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def find_span(ids: Sequence[int], phrase_ids: Sequence[int], start: int = 0) -> slice:
    """The first occurrence of `phrase_ids` in `ids` at or after `start`."""
    from clif.compose.prompt import find_spans

    for span in find_spans(ids, phrase_ids):
        if span.start >= start:
            return span
    raise ValueError(f"phrase ids {list(phrase_ids)} not found in {list(ids)}")


def leak(encode: Encode, phrase_ids: Callable[[str], list[int]], first: str, second: str, templates=PAIR_TEMPLATES):
    """leak(second <- first), averaged over `templates`; also per template. `first`/`second` are what a prompt
    writes for each concept (its token, or its plain words); `phrase_ids` gives their ids inside a prompt."""
    singles = [SINGLE.format(first), SINGLE.format(second)]
    pairs = [t.format(first, second) for t in templates]
    states, ids = encode(singles + pairs)
    a_ids, b_ids = phrase_ids(first), phrase_ids(second)

    def mean_state(row: int, span_ids, after: int = 0) -> torch.Tensor:
        return states[row, find_span(ids[row].tolist(), span_ids, after)].float().mean(0)

    h_a, h_b = mean_state(0, a_ids), mean_state(1, b_ids)
    d = h_a - h_b
    per = {}
    for k, t in enumerate(templates):
        row = 2 + k
        a_at = find_span(ids[row].tolist(), a_ids)
        h_pair = mean_state(row, b_ids, a_at.stop)  # the second concept: after the first one's tokens
        per[t] = float((h_pair - h_b) @ d / (d @ d).clamp_min(1e-12))
    return {"leak": sum(per.values()) / len(per), "per_template": per}


def pair_leaks(encode: Encode, phrase_ids, texts: dict[str, str], templates=PAIR_TEMPLATES) -> dict[str, dict]:
    """leak in both orders of every pair of concepts: {"b<-a": {...}, "a<-b": {...}}."""
    names, out = list(texts), {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for x, y in ((a, b), (b, a)):
                out[f"{y}<-{x}"] = leak(encode, phrase_ids, texts[x], texts[y], templates)
    return out


class TextProbe:
    """A base model's text side with a stage dir's concepts (rows, text LoRA, whole encoders) loaded as
    inference.py loads them; `encode` gives what the UNet reads (with `isolate`, a clif.compose.plan.Options whose
    isolate is set, the concepts' isolated states spliced in, as inference.py generates with them)."""

    def __init__(self, base: str, stage_dir: str | None = None, isolate=None):
        from clif.compose.isolate import Encoder
        from clif.generate import load_pipeline
        from clif.models import from_pipeline

        self.pipe, family = load_pipeline(base, stage_dir, device="cpu", dtype=torch.float32)
        self.model = from_pipeline(self.pipe, family, base)
        self.text = Encoder(self.pipe, self.model)
        self.isolate = isolate if isolate is not None and isolate.isolate != "none" else None
        self.tokens = []
        if stage_dir is not None:
            from clif.outputs.artifacts import read_manifest

            self.tokens = [c["token"] for c in read_manifest(stage_dir)["concepts"]]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.text.ids(prompts)
        if self.isolate is None:
            return self.text.encode(ids)[0], ids[0]
        from clif.compose.isolate import isolated
        from clif.compose.prompt import named_concepts

        o = self.isolate
        plain, states = self.text.encode(ids)[0], []
        for k, p in enumerate(prompts):  # as generation does: a prompt naming one concept is encoded as it is
            named = named_concepts(p, self.tokens)
            if len(named) < 2:
                states.append(plain[k : k + 1])
                continue
            states.append(isolated(self.text, p, named, by=o.isolate, weight=o.isolate_weight, end=o.isolate_end)[0])
        return torch.cat(states), ids[0]

    def phrase_ids(self, text: str) -> list[int]:
        return self.text.phrase_ids(text)

    def leaks(self, texts: dict[str, str]) -> dict[str, dict]:
        return pair_leaks(self.encode, self.phrase_ids, texts)

    @torch.no_grad()
    def retrieval(self, clip_path: str, images: dict[str, list], texts: dict[str, str]) -> float:
        """Text -> image retrieval among the concepts: each image of concept c is retrieved by "a photo of
        <text of c>" through the text encoder's pooled output and the paired CLIP (as stage 1 measures it)."""
        from clif.contrastive.paired import PairedCLIP

        enc, tok = self.model.text_encoders[-1], self.model.tokenizers[-1]
        paired = PairedCLIP(clip_path, enc, "cpu", torch.float32)
        names = list(texts)
        ids = self.text.ids([f"a photo of {texts[n]}" for n in names])[-1]
        t = torch.nn.functional.normalize(paired.text_features(enc, ids, tok.eos_token_id), dim=-1)
        hits = total = 0
        for k, n in enumerate(names):
            f = torch.nn.functional.normalize(paired.image_features(images[n]), dim=-1)
            hits += int(((f @ t.T).argmax(-1) == k).sum())
            total += len(images[n])
        return hits / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    from clif.cli import Parser, user_errors
    from clif.errors import UserError
    from clif.outputs.artifacts import atomic_write_json, read_manifest

    p = Parser(prog="python -m clif.eval.leak", description=__doc__.split("\n\n")[0])  # one-line errors
    p.add_argument("--base", required=True, help="The base model (diffusers folder or hub id).")
    p.add_argument("--stage_dir", nargs="*", default=[], help="Stage dirs whose concept tokens to probe.")
    p.add_argument(
        "--words", nargs="+", required=True, help="name=plain words per concept, e.g. dog='corgi dog' (the reference)."
    )
    p.add_argument("--out", default=None, help="Write the result here as JSON.")
    args = p.parse_args(argv)
    with user_errors(p.prog):
        words = dict(w.split("=", 1) for w in args.words if "=" in w)
        empty = not all(k.strip() and v.strip() for k, v in words.items())
        if len(words) != len(args.words) or len(words) < 2 or empty:
            raise UserError("--words: give two or more name=words (e.g. dog='corgi dog')")
        result = {"words": TextProbe(args.base).leaks({n: w for n, w in words.items()})}
        for d in args.stage_dir:
            probe = TextProbe(args.base, d)
            tokens = {c["name"]: c["token"] for c in read_manifest(d)["concepts"]}
            missing = sorted(set(words) - set(tokens))
            if missing:
                raise UserError(f"{d} has no concept {missing[0]!r} (it has: {', '.join(tokens)})")
            result[d] = probe.leaks({n: tokens[n] for n in words})
        if args.out:
            atomic_write_json(Path(args.out), result)
    for key, leaks in result.items():
        print(key, ", ".join(f"{k} {v['leak']:.3f}" for k, v in leaks.items()))
    return result


if __name__ == "__main__":
    main()
