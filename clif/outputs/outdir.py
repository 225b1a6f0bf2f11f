"""Who owns an output folder: the checks before a run, the lock while it lives, clearing and stale temporaries."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

from clif.errors import UserError
from clif.outputs.artifacts import MANIFEST
from clif.validate import entries, folder_or_absent

LOCK = ".clif.lock"
# Everything a training run writes at the top of its output dir (plus <dir name>_kohya.safetensors).
_OURS = re.compile(
    r"^(clif_manifest\.json|README\.md|run_args\.json|run_stats\.json|embeddings|logs|validation|confusion\.(json|png)"
    r"|pytorch_lora_weights\.safetensors|checkpoint-\d+|\.checkpoint-\d+\.tmp|\.clif\.lock|\.lora-\w+|\..+\.tmp)$"
)
_STALE = re.compile(r"^(\.checkpoint-\d+\.tmp|\.lora-\w+|\..+\.tmp)$")
_HELD: dict[str, int] = {}  # output dir -> fd of its lock, for the life of the run


def is_clif_run(path: Path) -> bool:
    """True when `path` provably holds a CLIF training run: our marker files and nothing we did not write."""
    found = entries(path, "output dir")
    marked = (path / MANIFEST).is_file() or (path / "run_args.json").is_file()
    marked = marked or any(re.fullmatch(r"checkpoint-\d+", p.name) and (p / "state.json").is_file() for p in found)
    foreign = [p.name for p in found if not (_OURS.match(p.name) or p.name == f"{path.name}_kohya.safetensors")]
    return marked and not foreign


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other in out.parents:
        return "lies inside"
    if out in other.parents:
        return "contains"
    return None


def check_output_dir(
    path: str | Path, *, overwrite: bool, resuming: bool = False, inputs: tuple = (), deletes: bool = True
) -> None:
    """Refuse, before anything is written, an output dir that is (inside) an input, is a file, is locked by a
    live run, or holds something we may not replace. `deletes`: --overwrite replaces the folder (training);
    otherwise it only allows writing into it (inference, evaluation)."""
    path = Path(path)
    out = path.resolve()
    for name, value in inputs:
        if value and Path(value).exists():
            rel = _relation(out, Path(value).resolve())
            if rel and (deletes or rel != "lies inside"):  # writing next to an input's files is harmless
                raise UserError(f"--output_dir {path} {rel} the input {name} {value}; choose another folder")
    folder_or_absent(path, "output dir")
    if deletes and overwrite and not resuming and path.is_symlink():
        raise UserError(
            f"--output_dir {path} is a symbolic link (to {out}); --overwrite does not replace a link's target: "
            "pass the folder itself"
        )
    if not path.exists():
        return
    if lock_held(path):
        raise UserError(f"output dir {path} is in use by another running CLIF run (lock {LOCK} is held)")
    if not [p for p in entries(path, "output dir") if p.name != LOCK]:  # a lock alone: a run that wrote nothing
        return
    if resuming:
        return
    if not overwrite:
        hint = " or --resume_from_checkpoint to continue it" if deletes else ""
        raise UserError(f"output dir {path} already holds files; pass --overwrite to replace a previous run{hint}")
    if deletes and not is_clif_run(path):
        raise UserError(
            f"output dir {path} is not a CLIF run (or holds files CLIF did not write); "
            "refusing to delete it even with --overwrite"
        )


def lock_held(path: str | Path) -> bool:
    """Whether a live run holds the lock of `path` (writes nothing)."""
    lock = Path(path) / LOCK
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our probe lock
    return False


def open_run_dir(path: str | Path, *, overwrite: bool, resuming: bool) -> None:
    """After validation: delete a previous run (--overwrite), create the folder, take its lock, drop stale
    temporaries a killed run left. The lock is held until release_locks()."""
    path = Path(path)
    if lock_held(path):  # a run started since the check
        raise UserError(f"output dir {path} is in use by another running CLIF run (lock {LOCK} is held)")
    if overwrite and not resuming and path.exists():
        shutil.rmtree(path)
    lock_dir(path)
    (path / MANIFEST).unlink(missing_ok=True)  # a resumed run is unfinished until it writes its manifest again
    for folder in (path, path / "embeddings"):
        for p in folder.iterdir() if folder.is_dir() else []:
            if _STALE.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def lock_dir(path: str | Path) -> None:
    """Create `path` if needed and take its lock, held until release_locks(): every script that writes into an
    output dir (training, inference, evaluation) holds it, so two runs never interleave their files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"output dir {path} is in use by another running CLIF run (lock {LOCK} is held)") from None
    _HELD[str(path.resolve())] = fd


def release_lock(path: str | Path) -> None:
    """Release the lock of one output dir, if this process holds it."""
    fd = _HELD.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)


def held_locks() -> set[str]:
    return set(_HELD)


def release_locks(keep: set[str] = frozenset()) -> None:
    """Release the output-dir locks this process holds, except `keep` (end of a run, or its failure)."""
    for path in [p for p in _HELD if p not in keep]:
        os.close(_HELD.pop(path))
