"""Concepts inside a prompt: where each is named (words and token ids), the layout words, the region prompts."""

from __future__ import annotations

import re
from collections.abc import Sequence

# the side a layout word puts a concept on; "of" after it ("to the left of <b>") also puts the next concept opposite
SIDES = {
    "left": "left",
    "right": "right",
    "above": "top",
    "over": "top",
    "top": "top",
    "atop": "top",
    "below": "bottom",
    "under": "bottom",
    "beneath": "bottom",
    "underneath": "bottom",
    "bottom": "bottom",
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# relational words: the concept is on that side OF the next concept named
RELATIONAL = {"above", "over", "atop", "below", "under", "beneath", "underneath"}
SIDE_BOXES = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}
_WORD = re.compile(r"<[^<>\s]+>|[A-Za-z]+")


def named_concepts(prompt: str, tokens: Sequence[str]) -> list[str]:
    """The concept tokens a prompt names, in reading order (first mention), each once."""
    found = {}
    for t in tokens:
        m = re.search(r"(?<![\w<])" + re.escape(t) + r"(?![\w>])", prompt)
        if m:
            found[t] = m.start()
    return sorted(found, key=found.get)


def layout_sides(prompt: str, tokens: Sequence[str]) -> dict[str, str]:
    """The side each concept's layout words put it on ('left', 'right', 'top', 'bottom'): the words after a concept,
    up to the next concept, ("<a> on the left", "<a> to the left of <b>", "<a> above <b>"); a relational phrase
    also puts the next concept on the opposite side. Concepts without layout words are left out."""
    words = [w for w in _WORD.findall(prompt)]
    mentions = [i for i, w in enumerate(words) if w in tokens]
    own, implied = {}, {}
    for k, i in enumerate(mentions):
        end = mentions[k + 1] if k + 1 < len(mentions) else len(words)
        seg = [w.lower() for w in words[i + 1 : end]]
        side = next((SIDES[w] for w in seg if w in SIDES), None)
        if side is None:
            continue
        c = words[i]
        own.setdefault(c, side)
        j = next(j for j, w in enumerate(seg) if w in SIDES)
        relational = seg[j] in RELATIONAL or (j + 1 < len(seg) and seg[j + 1] == "of")
        if relational and k + 1 < len(mentions) and j >= len(seg) - 3:  # "... left of <b>": the phrase ends at <b>
            implied.setdefault(words[mentions[k + 1]], OPPOSITE[side])
    return {c: own.get(c, implied.get(c)) for c in tokens if c in own or c in implied}


def auto_boxes(prompt: str, tokens: Sequence[str]) -> tuple[dict[str, tuple[float, ...]], str]:
    """Boxes (x0, y0, x1, y1 in fractions) for the concepts a prompt names, and how they were found: from the
    layout words when they place every concept on its own side (with two concepts, one placed concept puts the other
    opposite), else the concepts in reading order, as equal vertical strips left to right."""
    named = named_concepts(prompt, tokens)
    sides = layout_sides(prompt, named)
    if len(named) == 2 and len(sides) == 1:
        side = next(iter(sides.values()))
        sides[next(t for t in named if t not in sides)] = OPPOSITE[side]
    if len(sides) == len(named) and len(set(sides.values())) == len(named):
        return {c: SIDE_BOXES[sides[c]] for c in named}, "layout words"
    n = len(named)
    why = "reading order" if not sides else "reading order (the layout words do not place every concept apart)"
    return {c: (k / n, 0.0, (k + 1) / n, 1.0) for k, c in enumerate(named)}, why


def substitute(prompt: str, replace: dict[str, str]) -> str:
    """`prompt` with each named token replaced by its text in `replace` (whole tokens only)."""
    if not replace:
        return prompt
    pattern = "|".join(r"(?<![\w<])" + re.escape(t) + r"(?![\w>])" for t in sorted(replace, key=len, reverse=True))
    return re.sub(pattern, lambda m: replace[m.group(0)], prompt)


def region_prompt(prompt: str, concept: str, named: Sequence[str], how: str, classes: dict[str, str]) -> str:
    """The prompt a region of `concept` reads. 'same': the global prompt with every concept slot set to this
    concept (it keeps the prompt's layout); 'class': the other concepts replaced by their class words; 'alone':
    'a photo of a <concept>'."""
    if how == "alone":
        return f"a photo of a {concept}"
    others = [t for t in named if t != concept]
    return substitute(prompt, {t: concept if how == "same" else classes[t] for t in others})


def find_spans(ids: Sequence[int], phrase: Sequence[int]) -> list[slice]:
    """Every non-overlapping occurrence of the id sequence `phrase` in `ids`, in order."""
    out, i, n = [], 0, len(phrase)
    while n and i <= len(ids) - n:
        if list(ids[i : i + n]) == list(phrase):
            out.append(slice(i, i + n))
            i += n
        else:
            i += 1
    return out
