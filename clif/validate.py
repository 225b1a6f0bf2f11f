"""Checks of user input shared by every script: typed JSON fields, file-name safety, flag combinations."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from clif.errors import UserError, hub_offline

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "an object",
    bool: "true/false",
}
_SAFE_NAME = re.compile(r"^[^/\\\x00]+$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: anything else that is not a path is a mistyped path


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file, or a UserError naming it (missing, a folder, not UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if not path.is_file():
        raise UserError(f"{what} {path} is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def read_json(path: str | Path, what: str = "file", kind: type = dict):
    """Parse a JSON file whose top level must be `kind`; UserError naming the file otherwise."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON in {path}: {err}") from None
    if not isinstance(data, kind):
        raise UserError(f"{path} must hold {_TYPE_NAMES[kind]} at the top level, not {type(data).__name__}")
    return data


def get_field(obj: dict, key: str, kind: type | tuple, where: str, *, default=..., nonempty: bool = True):
    """obj[key] checked for type (bool is not a number here); `default` makes it optional."""
    if key not in obj or obj[key] is None:
        if default is ...:
            raise UserError(f"{where}: field {key!r} is missing")
        return default
    value, kinds = obj[key], kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise UserError(f"{where}: field {key!r} must be {names}, got {json.dumps(value)[:40]}")
    if nonempty and isinstance(value, str) and not value.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return value


def string_list(obj: dict, key: str, where: str) -> list[str]:
    """An optional list of non-empty strings."""
    value = get_field(obj, key, list, where, default=[])
    if not all(isinstance(x, str) and x.strip() for x in value):
        raise UserError(f"{where}: field {key!r} must be a list of non-empty strings")
    return value


def file_name(name: str, where: str) -> str:
    """A name that becomes a file name (embeddings/<name>.safetensors): one path component, no escape."""
    if not _SAFE_NAME.match(name) or name in (".", "..") or name.startswith(".") or len(name) > 120:
        raise UserError(f"{where}: name {name!r} cannot be a file name (no '/', '\\\\', leading '.', at most 120)")
    return name


def existing_folder(path: str | Path, what: str) -> Path:
    """A folder the run reads: one line naming `what` when it is missing or a file."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} {path} {'is a file, not a folder' if path.exists() else 'does not exist'}")
    return path


def entries(path: str | Path, what: str) -> list[Path]:
    """The entries of a folder the run reads: one line naming `what` when it cannot be listed (no permission)."""
    try:
        return list(Path(path).iterdir())
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or type(err).__name__}") from None


def folder_or_absent(path: str | Path | None, what: str) -> None:
    """A folder the run will create or fill: a file in its place is refused."""
    if path and Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")


def check_tracker(report_to: str) -> None:
    """--report_to names a tracker that is installed."""
    needed = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": []}.get(report_to, [])
    for module in needed:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report_to {report_to} needs the {module} package: pip install {module}")


@dataclass(frozen=True)
class ModelSource:
    """A model a run will load by hub id or local path. `flag` names where it comes from, `avoid` the flags that do
    without it (or point it elsewhere), `named` whether the user gave it (else a default); `at` is the path or hub
    id behind `name` when they differ (open_clip's 'local-dir:' / 'hf-hub:'), `files` the hub files whose presence
    in the local cache means it loads offline."""

    flag: str
    name: str
    what: str
    avoid: str
    named: bool = True
    at: str | None = None
    files: tuple[str, ...] = ("config.json",)


def check_models(models: list[ModelSource]) -> None:
    """Before any model loads (reads no weights): a local path that does not exist (one line naming its flag and
    path), then a hub id that cannot load offline (not cached while HF_HUB_OFFLINE is set; one line naming the
    model and the flags that avoid it), those the user named before the defaults."""
    problems = []
    for m in models:
        where = m.at or m.name
        if Path(where).expanduser().exists():
            continue
        if not HUB_ID.match(where):
            problems.append((0, f"{m.flag} {m.name} does not exist"))
        elif hub_offline() and not _hub_cached(where, m.files):
            shown = repr(m.name) if where == m.name else f"{m.name!r} (hub {where})"
            why = f"cannot load {m.what} {shown}: HF_HUB_OFFLINE is set and it is not in the local hub cache"
            problems.append((1 if m.named else 2, f"{why}; {m.avoid}"))
    if problems:
        raise UserError(min(problems, key=lambda p: p[0])[1])  # the first of the most direct kind


def _hub_cached(repo: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)
    except ValueError:  # an id the hub refuses (e.g. 'a--b'): not cached
        return False
