"""The concept-set format (dataset/README.md): reading and validating `concepts.json` or plain folders."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from clif.errors import UserError
from clif.validate import entries, existing_folder, file_name, get_field, read_json, string_list

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_SIDE = 16  # pixels; smaller images cannot be segmented, cropped or encoded meaningfully
# CLIP reads 77 tokens (75 between start and end): two concepts and a caption of ~16 words must fit
MAX_VECTORS = 29
# how the samples of a run are shared among concepts (--concept_balance): equally per concept, or per image
BALANCES = ("concepts", "images")
# a concept's weight (kohya's num_repeats); the bound keeps one epoch of the sample stream in memory
MAX_REPEATS = 1000
REPEATS_FILE = "repeats.json"  # plain folders: {"<sub-folder>": repeats}


@dataclass
class Concept:
    """One customized concept: its placeholder token, words and images."""

    name: str
    token: str
    initializer: str
    class_word: str
    images: list[Path]
    num_vectors: int = 2
    masks_dir: Path | None = None
    parts: list[str] = field(default_factory=list)
    repeats: int = 1  # weight of the concept in the sample stream (dataset/README.md, "repeats")

    @property
    def tokens(self) -> list[str]:
        """The tokenizer entries of this concept (diffusers convention: `<t>`, `<t>_1`, ...)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "token": self.token,
            "num_vectors": self.num_vectors,
            "initializer": self.initializer,
            "class": self.class_word,
            "images": [str(p) for p in self.images],
            "parts": self.parts,
            "repeats": self.repeats,
        }


def list_images(folder: Path, what: str = "image folder") -> list[Path]:
    return sorted(p for p in entries(folder, what) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def open_rgb(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB; 16-bit greyscale is scaled down, not clipped to white."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            im = im.point(lambda v: v * (1 / 256)).convert("L")
        return im.convert("RGB")


def check_image(path: Path) -> None:
    """Raise a UserError naming `path` when it is not a decodable image of a usable size."""
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as err:  # noqa: BLE001  PIL raises many types for broken files
        raise UserError(f"cannot read image {path}: {err}") from None
    if min(size) < MIN_SIDE:
        raise UserError(f"image {path} is {size[0]}x{size[1]} pixels; need at least {MIN_SIDE} on each side")


def _from_json(root: Path, default_vectors: int) -> list[Concept]:
    where = root / "concepts.json"
    spec = read_json(where)
    entries = get_field(spec, "concepts", list, str(where))
    if not entries:
        raise UserError(f'{where} must hold a non-empty list under "concepts"')
    concepts = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise UserError(f"{where}: concept #{i} is not an object")
        at = f"{where}: concept #{i}"
        name = file_name(get_field(e, "name", str, at), at)
        at = f"{where}: concept {name!r}"
        token, initializer = get_field(e, "token", str, at), get_field(e, "initializer", str, at)
        img_dir = root / get_field(e, "images", str, at, default=f"images/{name}")
        masks = root / get_field(e, "masks", str, at, default=f"masks/{name}")
        nv = get_field(e, "num_vectors", int, at, default=default_vectors)
        if "num_repeats" in e:  # kohya's name: ignoring it would silently train unweighted
            raise UserError(f"{at}: field 'num_repeats' is kohya's name; write 'repeats' (dataset/README.md)")
        concepts.append(
            Concept(
                name=name,
                token=token,
                initializer=initializer,
                class_word=get_field(e, "class", str, at, default=initializer),
                images=_images_of(img_dir, name),
                num_vectors=nv,
                masks_dir=masks if masks.is_dir() else None,
                parts=string_list(e, "parts", at),
                repeats=repeats_field(e, "repeats", at),
            )
        )
    return concepts


def repeats_field(obj: dict, key: str, where: str) -> int:
    """obj[key] as a concept's repeats (default 1): a JSON integer in 1..MAX_REPEATS; 2.0, true, "2" and null are
    refused like 0 and -1, so that a typo never silently changes the weighting."""
    value = obj.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPEATS:
        shown = json.dumps(value)[:40]
        raise UserError(f"{where}: repeats must be an integer from 1 to {MAX_REPEATS}, got {shown}")
    return value


def _images_of(folder: Path, name: str) -> list[Path]:
    existing_folder(folder, f"concept {name!r}: image folder")
    images = list_images(folder, f"concept {name!r}: image folder")
    if not images:
        raise UserError(f"concept {name!r} has no images in {folder} (expected {', '.join(IMAGE_SUFFIXES)})")
    return images


def _from_folders(root: Path, initializer: str | None, class_word: str | None, nv: int) -> list[Concept]:
    classes: dict = {}
    if (root / "classes.json").exists():
        classes = read_json(root / "classes.json")
    subdirs = sorted(p for p in entries(root, "data dir") if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(f"{root} holds neither concepts.json nor concept sub-folders of images")
    where = root / REPEATS_FILE
    repeats = read_json(where) if where.exists() else {}
    unknown = sorted(set(repeats) - {d.name for d in subdirs})
    if unknown:
        names = ", ".join(d.name for d in subdirs)
        raise UserError(f"{where}: no concept named {unknown[0]!r} (the concepts are the sub-folders: {names})")
    concepts = []
    for d in subdirs:
        cls = class_word or get_field(classes, d.name, str, str(root / "classes.json"), default=None)
        if not cls:
            raise UserError(f"{root}: no class word for concept {d.name!r}; pass --class_word or add classes.json")
        token = "<" + re.sub(r"[^0-9A-Za-z_-]", "-", d.name) + ">"
        concepts.append(
            Concept(
                name=file_name(d.name, str(root)),
                token=token,
                initializer=initializer or cls,
                class_word=cls,
                images=_images_of(d, d.name),
                num_vectors=nv,
                repeats=repeats_field(repeats, d.name, f"{where}: concept {d.name!r}"),
            )
        )
    return concepts


def concept_slots(counts: list[int], repeats: list[int], balance: str) -> list[int]:
    """Samples each concept gets in one epoch of a sample stream, from its number of items (images; stage 1: its
    pieces) and its repeats. `images`: items x repeats (kohya's num_repeats: each item `repeats` times).
    `concepts`: the same share for every concept, times its repeats (relative: repeats 2, 2 act as 1, 1), in units
    of the largest concept's item count, so that every item appears at least once. No items, no samples."""
    if balance not in BALANCES:
        raise ValueError(f"balance {balance!r} is not one of {BALANCES}")
    if balance == "images":
        return [n * r for n, r in zip(counts, repeats)]
    g = math.gcd(*[r for n, r in zip(counts, repeats) if n])
    unit = max(counts, default=0)
    return [unit * r // g if n else 0 for n, r in zip(counts, repeats)]


def data_fingerprint(concepts: list[Concept]) -> str:
    """A short hash of every concept's name and image bytes (a resumed run must train on the same data)."""
    h = hashlib.sha256()
    for c in concepts:
        h.update(c.name.encode() + b"\0")
        for p in c.images:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def check_tokens(concepts: list[Concept], where: str) -> None:
    """Names and tokens are distinct; tokens are one word, and no two concepts share a tokenizer entry: the CLIP
    tokenizer lowercases, so '<Ball>' and '<ball>' are one token, and '<a>' with 2 vectors owns '<a>_1'."""
    names: set[str] = set()
    owner: dict[str, str] = {}
    for c in concepts:
        if c.name in names:
            raise UserError(f"{where}: duplicate name {c.name!r}")
        names.add(c.name)
        if not c.token or c.token.strip() != c.token or " " in c.token:
            raise UserError(f"concept {c.name!r}: token {c.token!r} must be one word without spaces")
        if not 1 <= c.num_vectors <= MAX_VECTORS:
            raise UserError(
                f"concept {c.name!r}: num_vectors {c.num_vectors} must be in 1..{MAX_VECTORS} "
                "(two concepts and a caption must fit in CLIP's 77 tokens)"
            )
        for t in c.tokens:
            other = owner.get(t.lower())
            if other is not None:
                what = "duplicate token" if other != c.name else "token repeats itself"
                raise UserError(
                    f"{where}: {what} {t!r}: concepts {other!r} and {c.name!r} collide "
                    "(tokens are case-insensitive; '<t>' with n vectors also owns '<t>_1'..)"
                )
            owner[t.lower()] = c.name


def load_concept_set(
    root: str | Path,
    *,
    initializer: str | None = None,
    class_word: str | None = None,
    num_vectors: int = 2,
) -> list[Concept]:
    """Read and validate a concept set; every image is decoded once so a broken file is named now."""
    root = existing_folder(root, "data dir")
    if not entries(root, "data dir"):
        raise UserError(f"data dir {root} is empty")
    if (root / "concepts.json").exists():
        if (root / REPEATS_FILE).exists():
            raise UserError(f"{root} holds concepts.json and {REPEATS_FILE}: set 'repeats' in concepts.json instead")
        concepts = _from_json(root, num_vectors)
    else:
        concepts = _from_folders(root, initializer, class_word, num_vectors)
    check_tokens(concepts, str(root))
    for c in concepts:
        if len(c.initializer.split()) != 1:
            raise UserError(f"concept {c.name!r}: initializer {c.initializer!r} must be a single word")
        for img in c.images:
            check_image(img)
    return concepts
