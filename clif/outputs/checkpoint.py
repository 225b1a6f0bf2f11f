"""Resumable checkpoints in safetensors + JSON only (no pickle): trainables, optimizer, schedule, RNG states."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from clif.errors import UserError
from clif.outputs.artifacts import atomic_save_safetensors, atomic_write_json, read_manifest

_STEP = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder named by --resume_from_checkpoint ('latest' or a path); UserError if absent."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return found[-1]
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / spec
    if not (path / "state.json").is_file():
        raise UserError(f"--resume_from_checkpoint: {spec} is not a checkpoint folder")
    return path


def check_resumable(
    path: Path, concepts: list, args: dict, data: str, *, harmless: set[str], before: dict | None = None
) -> None:
    """UserError when checkpoint `path` was made with other concepts, images, repeats or flags: every flag counts
    except the `harmless` ones (cli.harmless marks them where they are declared). `before`: the value a flag
    added later had in effect for a checkpoint whose manifest predates it (cli.BEFORE_FLAG)."""
    saved = read_manifest(path)
    mine = [(c.name, c.token, c.num_vectors) for c in concepts]
    theirs = [(e.get("name"), e.get("token"), e.get("num_vectors")) for e in saved.get("concepts", [])]
    if mine != theirs:
        raise UserError(f"cannot resume from {path}: it was trained on concepts {theirs}, this run has {mine}")
    for c, e in zip(concepts, saved.get("concepts", [])):
        if e.get("repeats", 1) != c.repeats:  # concepts.json's weights; older manifests: 1, as they trained
            raise UserError(
                f"cannot resume from {path}: concept {c.name!r} was trained with repeats {e.get('repeats', 1)}, "
                f"this run has {c.repeats}"
            )
    if saved.get("data_fingerprint", data) != data:
        raise UserError(f"cannot resume from {path}: the concept images differ from the ones it was trained on")
    old = {**(before or {}), **saved.get("args", {})}
    for k in sorted(set(old) & set(args) - harmless):
        now = json.loads(json.dumps(args[k], default=str))
        if old[k] != now:
            raise UserError(f"cannot resume from {path}: it was made with --{k} {old[k]}, this run has {now}")


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors(gens: list[torch.Generator]) -> dict[str, torch.Tensor]:
    out = {f"noise_generator.{i}": g.get_state() for i, g in enumerate(gens)}
    out["torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    trainables: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    scaler,
    generators: list[torch.Generator],
    *,
    limit: int | None,
    write_artifacts: Callable[[Path], None],
) -> Path:
    """Write checkpoint-<step>/ atomically (built under a temporary name, then renamed) and prune old ones."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        atomic_save_safetensors(trainables, tmp / "trainables.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        atomic_save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        atomic_save_safetensors(_rng_tensors(generators), tmp / "rng.safetensors")
        write_artifacts(tmp)  # embeddings (+ LoRA) and manifest: a checkpoint is also a usable stage dir
        atomic_write_json(
            tmp / "state.json",
            {
                "step": step,
                "optimizer": opt_meta,
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            },
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half checkpoint (a kill leaves one: the next run drops it)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)
    return final


def load_checkpoint(
    path: Path, trainables: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler, generators: list[torch.Generator]
) -> int:
    """Restore everything save_checkpoint wrote, in place; returns the optimizer step to continue from."""
    state = json.loads((path / "state.json").read_text())
    saved = load_file(str(path / "trainables.safetensors"))
    if set(saved) != set(trainables):
        raise UserError(f"{path} holds other trainable tensors than this run (different flags or concepts?)")
    with torch.no_grad():
        for k, p in trainables.items():
            if saved[k].shape != p.shape:
                raise UserError(f"{path}: tensor {k} has shape {tuple(saved[k].shape)}, this run {tuple(p.shape)}")
            p.copy_(saved[k])
    opt = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(opt, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    for i, g in enumerate(generators):
        g.set_state(rng[f"noise_generator.{i}"])
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return int(state["step"])
