"""A whole text encoder trained in stage 1 (`--train_text_encoder full`): which weights train, how the stage dir
stores them and how later stages and inference load them.

Format: `<stage dir>/<text_encoder_name>/` (`text_encoder/`, and `text_encoder_2/` on SDXL) is the encoder as
`save_pretrained` writes it (config.json + model.safetensors, the base vocabulary only: the concept rows stay in
`embeddings/`), so stock transformers loads it (`CLIPTextModel.from_pretrained(<dir>/text_encoder)`) and stock
diffusers takes it as a pipeline component. Later stages keep it frozen and copy the folders unchanged into their
own output, so every stage dir of the chain is self-contained. A LoRA file cannot carry a whole encoder: the
kohya / A1111 export is refused for such a chain (see `check_exportable`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from clif.errors import UserError
from clif.outputs import artifacts
from clif.tokens import ConceptEmbedding

WEIGHTS = "model.safetensors"


def trainable_params(model) -> dict[str, torch.nn.Parameter]:
    """Every weight of every text encoder but the vocabulary table (the concept rows train on their own) and the
    last layer where generation never reads it; cast to fp32 and unfrozen. Names: text_encoder_full.<i>.<name>."""
    out = {}
    for i, (enc, read) in enumerate(zip(model.text_encoders, model.text_last_layer_read)):
        vocab = enc.get_input_embeddings()
        vocab = vocab.base if isinstance(vocab, ConceptEmbedding) else vocab
        skip = {id(vocab.weight)}
        last = f"layers.{enc.config.num_hidden_layers - 1}."
        for name, p in enc.named_parameters():
            if id(p) in skip or name.endswith(".new") or (not read and f".{last}" in f".{name}"):
                continue
            p.data = p.data.float()
            p.requires_grad_(True)
            out[f"text_encoder_full.{i}.{name}"] = p
    return out


def folders(stage_dir: str | Path, model) -> list[Path]:
    """The whole-encoder folders a stage dir holds (empty when its chain trained no whole encoder)."""
    return [Path(stage_dir) / n for n in model.text_encoder_names if (Path(stage_dir) / n / WEIGHTS).is_file()]


def save(out: Path, model) -> list[str]:
    """Each text encoder (without the concept rows) as `out/<name>/`, atomically per folder; returns the names."""
    names = []
    for name, enc in zip(model.text_encoder_names, model.text_encoders):
        emb = enc.get_input_embeddings()
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as tmp:
            if isinstance(emb, ConceptEmbedding):
                enc.set_input_embeddings(emb.base)  # the base vocabulary only
            try:
                enc.save_pretrained(tmp, safe_serialization=True)
            finally:
                enc.set_input_embeddings(emb)
            _replace_dir(Path(tmp), out / name)
        names.append(name)
    return names


def copy(source: str | Path, out: Path, model) -> list[str]:
    """A later stage passes the frozen encoders on unchanged: the folders of `source`, copied atomically."""
    names = []
    for src in folders(source, model):
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{src.name}-") as tmp:
            shutil.copytree(src, Path(tmp) / "x")
            _replace_dir(Path(tmp) / "x", out / src.name)
        names.append(src.name)
    return names


def load(stage_dir: str | Path, model) -> bool:
    """Load a stage dir's whole encoders into the model's (plain, base-vocabulary) text encoders, frozen; False
    when it has none. Every file is checked before the first is loaded; a mismatch is one UserError line."""
    from safetensors.torch import load_file

    found = folders(stage_dir, model)
    for d in found:
        artifacts.check_safetensors(d / WEIGHTS)
    by_name = dict(zip(model.text_encoder_names, model.text_encoders))
    for d in found:
        enc = by_name[d.name]
        mine = enc.state_dict()
        state = {_own_key(k, mine): v for k, v in load_file(str(d / WEIGHTS)).items()}
        bad = sorted(set(mine) ^ set(state)) or [k for k in mine if mine[k].shape != state[k].shape]
        if bad:
            raise UserError(f"{d}: not a text encoder of this base model (tensor {bad[0]!r} differs)")
        enc.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})
        enc.requires_grad_(False)
    return bool(found)


def check_exportable(stage_dir: str | Path | None, model, what: str) -> None:
    """kohya / A1111 / ComfyUI LoRA files hold LoRA deltas and embeddings, not a whole text encoder."""
    if stage_dir and folders(stage_dir, model):
        raise UserError(
            f"{what}: {stage_dir} carries a whole fine-tuned text encoder (stage 1 --train_text_encoder full), which "
            "a kohya / A1111 / ComfyUI LoRA file cannot hold; use the stage dir with diffusers or inference.py, or "
            "train stage 1 with --train_text_encoder none|lora"
        )


def _own_key(key: str, mine: dict) -> str:
    """save_pretrained writes CLIPTextModel keys under `text_model.` (the layout of files in the wild), which
    transformers 5's module itself lacks: the file's key as the module names it."""
    if key in mine:
        return key
    if key.startswith("text_model.") and key[len("text_model.") :] in mine:
        return key[len("text_model.") :]
    return f"text_model.{key}" if f"text_model.{key}" in mine else key


def _replace_dir(src: Path, dst: Path) -> None:
    """Put folder `src` at `dst` (replacing an older one of ours, e.g. a re-written checkpoint) by renames."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
