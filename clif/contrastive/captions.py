"""Caption templates of the stage-1 pairs, built in or one per line from a file; `{}` marks the subject."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from clif.errors import UserError

# one subject; the subject phrase carries its own article ("<joe>", "a chef", "<joe>'s coat")
SINGLE = (
    "a photo of {}",
    "a rendering of {}",
    "a cropped photo of {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a good photo of {}",
    "a picture of {}",
    "an image of {}",
)
# two subjects: the first {} is the left one, the second the right one
LEFT_RIGHT = (
    "a photo of {} on the left and {} on the right",
    "a rendering of {} on the left and {} on the right",
    "a picture of {} on the left and {} on the right",
    "{} on the left, {} on the right",
    "a photo of {} and {}, left to right",
)


def _fill(template: str, phrases: list[str]) -> str:
    for p in phrases:  # str.replace, not format: a template may hold other braces
        template = template.replace("{}", p, 1)
    return template


@dataclass(frozen=True)
class Templates:
    """Single-subject templates and left/right ones; one is drawn per pair from the builder's seeded rng."""

    single: tuple[str, ...] = SINGLE
    left_right: tuple[str, ...] = LEFT_RIGHT

    def caption(self, phrases: list[str], rng: random.Random) -> str:
        """The caption of a pair showing `phrases` left to right (one or two subjects)."""
        if len(phrases) == 1:
            return _fill(rng.choice(self.single), phrases)
        if self.left_right:
            return _fill(rng.choice(self.left_right), phrases)
        return _fill(rng.choice(self.single), [f"{phrases[0]} on the left and {phrases[1]} on the right"])


def load_templates(path: str | Path) -> Templates:
    """Templates from a text file: one per line, `{}` once (one subject) or twice (left, right); '#' comments."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read caption templates {path}: {err}") from None
    single, pair = [], []
    for no, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k = line.count("{}")
        if k not in (1, 2):
            raise UserError(
                f"{path}:{no}: a caption template needs '{{}}' once (or twice for left/right), got {line!r}"
            )
        (single if k == 1 else pair).append(line)
    if not single:
        raise UserError(f"{path}: no caption template with a single '{{}}' (e.g. 'a photo of {{}}')")
    return Templates(tuple(single), tuple(pair))
