"""The models evaluate.py will load, checked before any of them loads: a path the user mistyped is named with its
flag, and a hub model that cannot load offline is named with the flags that do without it (clif.validate)."""

from __future__ import annotations

import os
from pathlib import Path

from clif.errors import UserError
from clif.validate import ModelSource, check_models

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hub weight names


def check_open_clip_name(name: str) -> None:
    """An open_clip architecture name (no 'hf-hub:' / 'local-dir:') that open_clip knows."""
    import open_clip

    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r} (see open_clip.list_models(), or use hf-hub:/local-dir:)")


def clip_source(name: str, pretrained: str | None, named: bool) -> ModelSource | None:
    """--clip_model: a transformers CLIPModel folder, 'local-dir:/path', 'hf-hub:org/repo', or an open_clip name
    whose --clip_pretrained weights come from the hub (None: nothing to check before loading)."""
    avoid = "give --clip_model a local model (local-dir:/path, or a transformers CLIPModel folder)"
    if (Path(name) / "config.json").is_file():
        return None
    schema, _, rest = name.partition(":")
    if schema == "local-dir":
        return ModelSource("--clip_model", name, "CLIP model", avoid, named, at=rest)
    if schema == "hf-hub":
        return ModelSource("--clip_model", name, "CLIP model", avoid, named, at=rest, files=("open_clip_config.json",))
    check_open_clip_name(name)
    import open_clip

    hub = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "") if pretrained else ""
    if not hub:  # no weights, a weights file, or a URL download: the load itself says what went wrong
        return None
    repo, file = os.path.split(hub)  # 'org/model/' (default file names) or 'org/model/file.bin'
    files = (file, f"{os.path.splitext(file)[0]}.safetensors") if file else OPEN_CLIP_FILES
    return ModelSource("--clip_model", name, "CLIP model", avoid, named, at=repo, files=files)


def check(args, metrics: set[str], defaults: dict) -> None:
    """Every model of this evaluation (--clip_model, --dino, --detector, --dc_model as `metrics` need them)."""
    named = {k for k, v in defaults.items() if getattr(args, k) != v}
    models = [clip_source(args.clip_model, args.clip_pretrained, "clip_model" in named)]
    if args.dino:
        models.append(ModelSource("--dino", args.dino, "DINO model", "give --dino a local folder, or leave it out"))
    if args.detector != "none":
        avoid = "give --detector a local OWLv2 folder, or --detector none (confusion from image halves, no D&C)"
        models.append(ModelSource("--detector", args.detector, "detector", avoid, "detector" in named))
    if "dc" in metrics and args.dc_model != "dreamsim":
        avoid = "give --dc_model a local DINOv2 folder, or leave D&C out with --metrics clip confusion"
        models.append(ModelSource("--dc_model", args.dc_model, "D&C feature model", avoid, "dc_model" in named))
    check_models([m for m in models if m is not None])
