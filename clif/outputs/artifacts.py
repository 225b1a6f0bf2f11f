"""Stage outputs (docs/formats.md): manifest, per-concept embedding files, atomic writes, stage dir checks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clif.concepts import Concept
from clif.errors import UserError
from clif.validate import existing_folder, file_name, get_field, read_json

MANIFEST = "clif_manifest.json"
ENCODER_KEYS = {"sd": None, "sdxl": ("clip_l", "clip_g")}


def _umask_mode() -> int:
    """Mode a plain open() would give a new file (mkstemp's temporaries are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embedding_tensors(family: str, concept: Concept, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file content of one concept: `{token: [n, D]}` (SD) or `{clip_l, clip_g}` (SDXL)."""
    keys = ENCODER_KEYS[family]
    if keys is None:
        return {concept.token: rows[0].float()}
    return {k: r.float() for k, r in zip(keys, rows)}


def save_embeddings(
    out: Path, family: str, concepts: list[Concept], rows: list[list[torch.Tensor]], meta: dict[str, str]
) -> None:
    """Write embeddings/<name>.safetensors for each concept; rows[i][e] = concept i's rows in encoder e."""
    for c, r in zip(concepts, rows):
        header = {
            **meta,
            "clif.token": c.token,
            "clif.num_vectors": str(c.num_vectors),
            "clif.initializer": c.initializer,
            "clif.class": c.class_word,
        }
        atomic_save_safetensors(embedding_tensors(family, c, r), out / "embeddings" / f"{c.name}.safetensors", header)


def check_safetensors(path: str | Path) -> None:
    """UserError naming `path` when it is missing or not a complete safetensors file (truncated, corrupt)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing" + (" (a folder)" if path.exists() else ""))
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # noqa: BLE001  SafetensorError is not importable under a stable name
        raise UserError(f"{path} is not a valid safetensors file ({str(err).splitlines()[0]})") from None


def load_embedding_file(
    path: Path, family: str, widths: list[int] | None = None, num_vectors: int | None = None
) -> tuple[list[torch.Tensor], dict[str, str]]:
    """Rows per encoder and header metadata of one embedding file, checked against the encoders' `widths`."""
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = ENCODER_KEYS[family] or list(f.keys())
        present = set(f.keys())
        missing = [k for k in keys if k not in present]
        if missing or (ENCODER_KEYS[family] is None and len(keys) != 1):
            raise UserError(f"{path} is not a {family} embedding file (keys {list(f.keys())})")
        rows = [f.get_tensor(k) for k in keys]
    for i, r in enumerate(rows):
        want = [num_vectors, widths[i] if widths else None]
        if r.dim() != 2 or any(w is not None and w != s for w, s in zip(want, r.shape)):
            need = "x".join("n" if w is None else str(w) for w in want)
            raise UserError(f"{path}: embedding of shape {tuple(r.shape)} does not fit this model (need {need})")
    return rows, meta


def read_manifest(stage_dir: str | Path) -> dict:
    """The manifest of a finished stage dir, its fields checked for type (UserError naming the field)."""
    path = Path(stage_dir) / MANIFEST
    existing_folder(stage_dir, "stage dir")
    if not path.is_file():
        raise UserError(f"{stage_dir} is not a finished CLIF stage output (no {MANIFEST})")
    manifest = read_json(path)
    for key in ("stage", "base_model", "base_fingerprint"):
        get_field(manifest, key, str, str(path))
    if get_field(manifest, "family", str, str(path)) not in ENCODER_KEYS:
        raise UserError(f"{path}: field 'family' must be one of {', '.join(ENCODER_KEYS)}")
    entries = get_field(manifest, "concepts", list, str(path))
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise UserError(f"{path}: concept #{i} is not an object")
        where = f"{path}: concept #{i}"
        file_name(get_field(e, "name", str, where), where)
        get_field(e, "token", str, where)
        get_field(e, "num_vectors", int, where)
    get_field(manifest, "args", dict, str(path), default={})
    return manifest


def check_stage_compatible(
    manifest: dict, stage_dir: str | Path, family: str, fingerprint: str | None, base: str
) -> None:
    """Refuse a stage dir made for another family or base model (fingerprint None: the family only, before loading)."""
    if manifest.get("family") != family:
        raise UserError(f"{stage_dir} was trained for family {manifest.get('family')!r}, but {base} is {family!r}")
    if fingerprint is not None and manifest.get("base_fingerprint") != fingerprint:
        raise UserError(
            f"{stage_dir} was trained on base model {manifest.get('base_model')!r}, "
            f"not on {base} (text encoder weights differ)"
        )


def stage_rows(
    manifest: dict, stage_dir: str | Path, family: str, widths: list[int]
) -> dict[str, tuple[dict, list[torch.Tensor]]]:
    """name -> (manifest concept entry, rows per encoder of the given widths) of a stage output."""
    result = {}
    for entry in manifest.get("concepts", []):
        path = Path(stage_dir) / "embeddings" / f"{entry['name']}.safetensors"
        if not path.is_file():
            raise UserError(f"{stage_dir}: embedding file {path.name} is missing")
        rows, _ = load_embedding_file(path, family, widths, entry["num_vectors"])
        result[entry["name"]] = (entry, rows)
    return result


def write_manifest(
    out: Path,
    *,
    stage: str,
    family: str,
    base: str,
    fingerprint: str,
    concepts: list[Concept],
    args: dict,
    inputs: list[str],
    files: dict[str, list[str]] | None = None,
    extra: dict | None = None,
) -> None:
    entries = []
    for c in concepts:
        d = c.describe()
        d["files"] = [f"embeddings/{c.name}.safetensors"]
        entries.append(d)
    atomic_write_json(
        out / MANIFEST,
        {
            "stage": stage,
            "family": family,
            "base_model": base,
            "base_fingerprint": fingerprint,
            "concepts": entries,
            "args": args,
            "inputs": inputs,
            "files": files or {},
            **(extra or {}),
        },
    )
