"""The concept-set format (dataset/README.md): reading and validating `concepts.json` or plain folders."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .cli import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


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
        }


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def check_image(path: Path) -> None:
    """Raise a UserError naming `path` when it is not a decodable image."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as err:  # noqa: BLE001  PIL raises many types for broken files
        raise UserError(f"cannot read image {path}: {err}") from None


def _from_json(root: Path, default_vectors: int) -> list[Concept]:
    try:
        spec = json.loads((root / "concepts.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"invalid {root / 'concepts.json'}: {err}") from None
    entries = spec.get("concepts") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f'{root / "concepts.json"} must hold a non-empty list under "concepts"')
    concepts = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise UserError(f"{root / 'concepts.json'}: concept #{i} is not an object")
        missing = [k for k in ("name", "token", "initializer") if not isinstance(e.get(k), str) or not e.get(k)]
        if missing:
            raise UserError(f"{root / 'concepts.json'}: concept #{i} lacks {', '.join(missing)}")
        name = e["name"]
        img_dir = root / e.get("images", f"images/{name}")
        masks = root / e.get("masks", f"masks/{name}")
        nv = e.get("num_vectors", default_vectors)
        if not isinstance(nv, int) or nv < 1:
            raise UserError(f"{root / 'concepts.json'}: concept {name!r} has num_vectors {nv!r} (need an integer >= 1)")
        parts = e.get("parts", [])
        if not isinstance(parts, list) or not all(isinstance(x, str) for x in parts):
            raise UserError(f"{root / 'concepts.json'}: concept {name!r} has 'parts' that is not a list of words")
        concepts.append(
            Concept(
                name=name,
                token=e["token"],
                initializer=e["initializer"],
                class_word=e.get("class", e["initializer"]),
                images=_images_of(img_dir, name),
                num_vectors=nv,
                masks_dir=masks if masks.is_dir() else None,
                parts=parts,
            )
        )
    return concepts


def _images_of(folder: Path, name: str) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"concept {name!r}: image folder {folder} does not exist")
    images = list_images(folder)
    if not images:
        raise UserError(f"concept {name!r} has no images in {folder} (expected {', '.join(IMAGE_SUFFIXES)})")
    return images


def _from_folders(root: Path, initializer: str | None, class_word: str | None, nv: int) -> list[Concept]:
    classes: dict = {}
    if (root / "classes.json").is_file():
        try:
            classes = json.loads((root / "classes.json").read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"invalid {root / 'classes.json'}: {err}") from None
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(f"{root} holds neither concepts.json nor concept sub-folders of images")
    concepts = []
    for d in subdirs:
        cls = class_word or classes.get(d.name)
        if not cls:
            raise UserError(f"{root}: no class word for concept {d.name!r}; pass --class_word or add classes.json")
        token = "<" + re.sub(r"[^0-9A-Za-z_-]", "-", d.name) + ">"
        concepts.append(
            Concept(
                name=d.name,
                token=token,
                initializer=initializer or cls,
                class_word=cls,
                images=_images_of(d, d.name),
                num_vectors=nv,
            )
        )
    return concepts


def load_concept_set(
    root: str | Path,
    *,
    initializer: str | None = None,
    class_word: str | None = None,
    num_vectors: int = 2,
) -> list[Concept]:
    """Read and validate a concept set; every image is decoded once so a broken file is named now."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data dir {root} does not exist")
    if not any(root.iterdir()):
        raise UserError(f"data dir {root} is empty")
    if (root / "concepts.json").is_file():
        concepts = _from_json(root, num_vectors)
    else:
        concepts = _from_folders(root, initializer, class_word, num_vectors)
    for attr in ("name", "token"):
        seen: set[str] = set()
        for c in concepts:
            v = getattr(c, attr)
            if v in seen:
                raise UserError(f"{root}: duplicate {attr} {v!r}")
            seen.add(v)
    for c in concepts:
        if c.token.strip() != c.token or " " in c.token:
            raise UserError(f"concept {c.name!r}: token {c.token!r} must be one word without spaces")
        if len(c.initializer.split()) != 1:
            raise UserError(f"concept {c.name!r}: initializer {c.initializer!r} must be a single word")
        for img in c.images:
            check_image(img)
    return concepts
