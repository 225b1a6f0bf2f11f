"""The ladder's concepts: pairs of look-alikes from clearly different to near twins, their training renders (with
masks and common-concept negatives) and the prompt templates every method generates."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from clif.errors import UserError

from .world import CLASSES, COLORS, PATTERNS, Obj, Scene, random_background, random_obj, render

DEFAULT_RUNGS_FILE = Path(__file__).with_name("rungs.json")  # the ladder: from clearly different to near twins
FIELDS = {"class": CLASSES, "color": tuple(COLORS), "mark": PATTERNS, "mark_color": tuple(COLORS)}
N_TRAIN = 5  # training renders per concept unless its "images" says otherwise
MAX_IMAGES = 1000  # a cap on "images": a few zeros too many would render for hours


class Rung(dict):
    """{concept name: Obj}, plus `images`: {concept name: training renders} where a rung sets them."""

    images: dict[str, int]


def load_rungs(path: str | Path = DEFAULT_RUNGS_FILE) -> dict[str, dict[str, Obj]]:
    """`{"rungs": {rung: {concept: {"class", "color", "mark"?, "mark_color"?}}}}`, each value checked against the
    world's vocabulary; any mistake is one UserError line naming the rung, concept and field."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--rungs_file {path}: cannot read it as JSON ({err})") from None
    rungs = data.get("rungs") if isinstance(data, dict) else None
    if not isinstance(rungs, dict) or not rungs:
        raise UserError(f"--rungs_file {path}: needs a non-empty object 'rungs' ({{rung: {{concept: fields}}}})")
    return {rung: check_concepts(concepts, f"--rungs_file {path}: rung {rung!r}") for rung, concepts in rungs.items()}


def select_rungs(path: str | Path, names: list[str] | None, flag: str) -> dict[str, Rung]:
    """The rungs `names` of the rungs file (all of them when None); a name the file lacks is a UserError naming
    `flag`."""
    rungs = load_rungs(path)
    missing = [n for n in names or () if n not in rungs]
    if missing:
        raise UserError(f"{flag}: {missing[0]!r} is not in {path} (it has: {', '.join(rungs)})")
    return rungs if names is None else {n: rungs[n] for n in names}


def add_rungs_file_arg(p) -> None:
    p.add_argument(
        "--rungs_file",
        default=str(DEFAULT_RUNGS_FILE),
        help="JSON of the ladder's rungs (default: clif/toyworld/rungs.json: distinct, lookalike, twin, ...; format in "
        "its _about and docs/toyworld.md).",
    )


def check_concepts(concepts, where: str) -> Rung:
    """`{concept: {"class", "color", "mark"?, "mark_color"?, "images"?}}` checked against the world's vocabulary;
    a mistake is one UserError line that starts with `where` and names the concept and field."""
    if not isinstance(concepts, dict) or len(concepts) < 2:
        raise UserError(f"{where} needs two or more concepts")
    objs = Rung()
    objs.images = {}
    for name, spec in concepts.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)):
            raise UserError(f"{where}: concept name {name!r} must be lower-case letters, digits and _")
        if not isinstance(spec, dict) or "class" not in spec or "color" not in spec:
            raise UserError(f"{where}, concept {name!r}: needs at least 'class' and 'color'")
        unknown = sorted(set(spec) - set(FIELDS) - {"images"})
        if unknown:
            raise UserError(
                f"{where}, concept {name!r}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)}, images)"
            )
        for field, allowed in FIELDS.items():
            if field in spec and spec[field] not in allowed:
                raise UserError(
                    f"{where}, concept {name!r}: {field} {spec[field]!r} is not in the world ({', '.join(allowed)})"
                )
        objs[name] = Obj(spec["class"], spec["color"], spec.get("mark", "solid"), spec.get("mark_color", "black"))
        n = spec.get("images", N_TRAIN)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            raise UserError(
                f"{where}, concept {name!r}: images must be an integer from 1 to {MAX_IMAGES} (training renders), "
                f"got {json.dumps(n)[:40]}"
            )
        objs.images[name] = n
    if len({o.identity() for o in objs.values()}) < len(objs):
        raise UserError(f"{where}: two concepts are the same object")
    return objs


SINGLE_PROMPTS = ("a photo of a {0}", "a {0}")
PAIR_PROMPTS = (
    "a photo of a {0} on the left and a {1} on the right",
    "a {0} on the left and a {1} on the right",
    "a photo of a {1} on the left and a {0} on the right",
    "a {1} on the left and a {0} on the right",
)


def render_concept(obj: Obj, rng: np.random.Generator, size: int, slot: str = "center"):
    """One render of a concept on a fresh background: image and mask."""
    o = replace(obj, slot=slot, dy=float(rng.uniform(-0.06, 0.06)))
    img, masks = render(Scene((o,), random_background(rng), int(rng.integers(2**31))), size)
    return img, masks[0]


def write_concept_set(root: Path, concepts: dict[str, Obj], size: int, n_common: int = 8, seed: int = 0) -> Path:
    """The custom concepts (N_TRAIN renders each, or a Rung's `images`; masks from the generator) and, as stage-1
    common-concept negatives, `n_common` other instances of each concept's class (random colour and mark), with
    their masks."""
    rng = np.random.default_rng([seed, 11])
    entries = []
    for name, obj in concepts.items():
        for sub in ("images", "masks"):
            (root / sub / name).mkdir(parents=True, exist_ok=True)
        for i in range(getattr(concepts, "images", {}).get(name, N_TRAIN)):
            img, mask = render_concept(obj, rng, size, ("center", "left", "right")[i % 3] if i >= 3 else "center")
            img.save(root / "images" / name / f"{i:02d}.png")
            mask.save(root / "masks" / name / f"{i:02d}.png")
        entries.append(
            {
                "name": name,
                "token": f"<{name}>",
                "initializer": obj.cls,
                "class": obj.cls,
                "images": f"images/{name}",
                "masks": f"masks/{name}",
            }
        )
    idents = {c.identity() for c in concepts.values()}
    for cls in sorted({c.cls for c in concepts.values()}):
        (root / "common" / cls / "masks").mkdir(parents=True, exist_ok=True)
        k = 0
        while k < n_common:
            other = replace(random_obj(rng, "center"), cls=cls)
            if other.identity() in idents:
                continue
            img, mask = render_concept(other, rng, size)
            img.save(root / "common" / cls / f"{k:02d}.png")
            mask.save(root / "common" / cls / "masks" / f"{k:02d}.png")
            k += 1
    (root / "concepts.json").write_text(json.dumps({"concepts": entries}, indent=2) + "\n")
    return root


def prompt_set(concepts: dict[str, Obj]) -> list[str]:
    """inference.py's templates: {0} is filled with each concept, {0}/{1} with the pair (in concepts.json order)."""
    return [*SINGLE_PROMPTS, *PAIR_PROMPTS]
