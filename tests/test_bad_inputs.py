"""A corpus of bad inputs across the five scripts (docs/design.md, "Errors"): each ends with exit 2 (exit 1: a run that diverges),
exactly one stderr line that names the problem, no traceback, and nothing written (inputs and output untouched).

Runs in-process through main(argv); the expensive fixtures (tiny models, a stage-2 run, generated images) are
built once per module, and almost every case is refused before a model is loaded.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, ti_args
from PIL import Image
from safetensors.torch import save_file

import evaluate
import inference
import train_clif
import train_lora
import train_ti
from clif.errors import UserError
from clif.eval.leak import main as leak_main
from clif.toyworld.__main__ import main as toyworld_main

MAINS = {"ti": train_ti.main, "lora": train_lora.main, "clif": train_clif.main, "inf": inference.main,
         "eval": evaluate.main, "toy": toyworld_main, "leak": leak_main}


class World:
    """Shared, read-only inputs, each built on first use: most cases need only the model and the concept set."""

    def __init__(self, sd: Path, xl: Path, data: Path, root: Path):
        self.sd, self.xl, self.data, self.root = sd, xl, data, root

    @functools.cached_property
    def stage(self) -> Path:  # a stage-2 run with checkpoint-1 and checkpoint-2
        out = self.root / "ti"
        train_ti.main(ti_args(self.sd, self.data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
        return out

    @functools.cached_property
    def stage_xl(self) -> Path:
        out = self.root / "ti_xl"
        train_ti.main(ti_args(self.xl, self.data, out, "--max_train_steps", "1"))
        return out

    @functools.cached_property
    def gen(self) -> Path:  # inference.py images with their sidecars
        out = self.root / "gen"
        inference.main(["--pretrained_model_name_or_path", str(self.sd), "--stage_dir", str(self.stage), "--prompt",
                        "a photo of <redball>", "--output_dir", str(out), "--num_images_per_prompt", "1",
                        "--num_inference_steps", "1"])
        return out

    def built(self) -> list[Path]:
        return [self.sd, self.data, *[self.__dict__[k] for k in ("stage", "stage_xl", "gen") if k in self.__dict__]]


@dataclass
class Ctx:
    """Paths of one case: the shared inputs and the case's own folder."""

    world: World
    tmp: Path

    def __getattr__(self, name: str):
        return getattr(self.world, name)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst)
        return dst

    def concepts(self, edit) -> Path:
        """A copy of the concept set with concepts.json edited (edit(spec) mutates it, or returns raw bytes)."""
        root = self.copy(self.data, "set")
        spec = json.loads((root / "concepts.json").read_text())
        raw = edit(spec)
        (root / "concepts.json").write_bytes(raw if isinstance(raw, bytes) else json.dumps(spec).encode())
        return root

    def manifest(self, edit) -> Path:
        """A copy of the stage-2 run with its manifest edited."""
        root = self.copy(self.stage, "stage")
        m = json.loads((root / "clif_manifest.json").read_text())
        edit(m)
        (root / "clif_manifest.json").write_text(json.dumps(m))
        return root


def _ti(c: Ctx, *extra, data=None, out=None):
    return ti_args(c.sd, data or c.data, out or c.out, *extra)


def _lora(c: Ctx, *extra, stage=None, model=None, out=None):
    return [*ti_args(model or c.sd, c.data, out or c.out), "--stage_dir", str(stage or c.stage), "--rank", "2",
            *extra]


def _clif(c: Ctx, *extra, data=None, model=None):
    return ["--pretrained_model_name_or_path", str(model or c.sd), "--train_data_dir", str(data or c.data), "--output_dir",
            str(c.out), "--cache_dir", str(c.tmp / "cache"), "--segmenter", str(c.tmp / "noseg"), "--report_to",
            "none", "--num_pairs", "8", "--train_batch_size", "4", "--max_train_steps", "1", *extra]


def _inf(c: Ctx, *extra, prompt=True):
    return ["--pretrained_model_name_or_path", str(c.sd), "--output_dir", str(c.out), "--num_inference_steps", "1",
            "--num_images_per_prompt", "1", *(["--prompt", "a photo of a dog"] if prompt else []), *extra]


def _ev(c: Ctx, *extra, images=None, concepts=None):
    return ["--images", str(images or c.gen), "--concepts", str(concepts or c.data), "--output_dir", str(c.out),
            "--detector", "none", *extra]


def _text(c: Ctx, name: str, data: bytes) -> Path:
    p = c.tmp / name
    p.write_bytes(data)
    return p


def _folder(c: Ctx, name: str, files: dict[str, bytes]) -> Path:
    d = c.tmp / name
    d.mkdir()
    for f, data in files.items():
        (d / f).write_bytes(data)
    return d


def _png(size=(32, 32), mode="RGB") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _gen_with(c: Ctx, sidecar: bytes | None = None, prompts: bytes | None = None) -> Path:
    files = {"a.png": _png()}
    if sidecar is not None:
        files["a.json"] = sidecar
    if prompts is not None:
        files["prompts.json"] = prompts
    return _folder(c, "gen2", files)


def _stage_file(c: Ctx, rel: str, data: bytes | None = None, tensors: dict | None = None) -> Path:
    root = c.copy(c.stage, "stage")
    if tensors is not None:
        save_file(tensors, str(root / rel))
    else:
        (root / rel).write_bytes(data)
    return root


def _truncated(c: Ctx, rel: str) -> Path:
    root = c.copy(c.stage, "stage")
    b = (root / rel).read_bytes()
    (root / rel).write_bytes(b[: len(b) // 2])
    return root


def _image_edit(c: Ctx, how) -> Path:
    root = c.copy(c.data, "set")
    how(root / "images" / "redball")
    return root


def _plain(c: Ctx, classes: bytes | None, repeats: bytes | None = None) -> Path:
    root = c.tmp / "plain"
    (root / "thing").mkdir(parents=True)
    (root / "thing" / "a.png").write_bytes(_png())
    if classes is not None:
        (root / "classes.json").write_bytes(classes)
    if repeats is not None:
        (root / "repeats.json").write_bytes(repeats)
    return root


def _with_repeats_json(c: Ctx) -> Path:
    root = c.copy(c.data, "set")
    (root / "repeats.json").write_text('{"redball": 2}')
    return root


def _ckpt_run(c: Ctx) -> Path:
    """A copy of the stage-2 run (it has checkpoint-1 and checkpoint-2) as this case's output dir."""
    shutil.copytree(c.stage, c.out)
    return c.out


def _other_images(c: Ctx) -> Path:
    root = c.copy(c.data, "set")
    first = min((root / "images" / "redball").iterdir())
    im = Image.open(first).convert("RGB")
    im.putpixel((0, 0), (1, 2, 3))
    im.save(first)
    return root


C = Ctx  # brevity in the table
CASES: dict[str, tuple] = {}  # id -> (script, argv(ctx), keyword, exit code)


def case(cid: str, script: str, argv, needle: str, code: int = 2) -> None:
    assert cid not in CASES, cid
    CASES[cid] = (script, argv, needle, code)


# ---- number flags shared by the three training scripts: non-finite, out of range, negative, not a number
TRAIN_NUMBERS = [
    ("--learning_rate", "nan"), ("--learning_rate", "inf"), ("--learning_rate", "-1e-3"), ("--learning_rate", "0"),
    ("--learning_rate", "fast"), ("--max_grad_norm", "nan"), ("--max_grad_norm", "-inf"), ("--max_grad_norm", "0"),
    ("--adam_beta1", "1"), ("--adam_beta1", "1.5"), ("--adam_beta1", "-0.1"), ("--adam_beta2", "nan"),
    ("--adam_weight_decay", "-0.01"), ("--adam_weight_decay", "inf"), ("--adam_epsilon", "0"),
    ("--seed", "-1"), ("--seed", str(2**64)), ("--seed", str(2**63)), ("--seed", "1.5"),
    ("--max_train_steps", "0"), ("--max_train_steps", "-5"), ("--train_batch_size", "0"),
    ("--gradient_accumulation_steps", "0"), ("--noise_offset", "nan"), ("--noise_offset", "-1"),
    ("--lr_warmup_steps", "-1"), ("--checkpointing_steps", "0"), ("--checkpoints_total_limit", "0"),
    ("--num_train_epochs", "0"), ("--num_vectors", "0"), ("--lr_scheduler", "sometimes"),
    ("--mixed_precision", "fp8"), ("--report_to", "mlflow"),
]
CHOICES = {"--lr_scheduler", "--mixed_precision", "--report_to", "--train_text_encoder", "--scheduler", "--dtype"}


def _number_needle(flag: str, value: str) -> str:
    """What the message must say: the flag and why the value is wrong (not argparse's 'expected one argument')."""
    if flag in CHOICES:
        return f"{flag}: invalid choice"
    try:
        float(value)
    except ValueError:
        return f"{flag}: expected"
    return f"{flag}: expected an integer" if "." in value and flag == "--seed" else f"{flag}: must be"


for script, build in (("ti", _ti), ("lora", _lora), ("clif", _clif)):
    for flag, value in TRAIN_NUMBERS:
        case(f"{script}{flag}={value}", script, lambda c, b=build, f=flag, v=value: b(c, f, v),
             _number_needle(flag, value))
for script, build in (("ti", _ti), ("lora", _lora)):
    case(f"{script}-resolution-60", script, lambda c, b=build: b(c, "--resolution", "60"), "multiple of 8")
    case(f"{script}-resolution-neg", script, lambda c, b=build: b(c, "--resolution", "-64"), "--resolution")
    case(f"{script}-workers-neg", script, lambda c, b=build: b(c, "--dataloader_num_workers", "-1"), "workers")
    case(f"{script}-validation-steps-0", script, lambda c, b=build: b(c, "--validation_steps", "0"), "validation")
    case(f"{script}-num-vectors-1000", script, lambda c, b=build: b(c, "--num_vectors", "1000"), "77 tokens")

# ---- stage 3 flags
for flag, value, needle in [
    ("--rank", "0", None), ("--lora_alpha", "nan", None), ("--lora_dropout", "1.5", None),
    ("--lora_dropout", "1", None), ("--lora_targets", "", "--lora_targets names no layer"),
    ("--lora_targets", "to_nothing", "to_nothing match no layer"), ("--snr_gamma", "nan", None),
    ("--snr_gamma", "0", None), ("--text_encoder_lr", "inf", None), ("--embedding_learning_rate", "-1", None),
    ("--prior_loss_weight", "nan", None), ("--num_class_images", "0", None),
]:
    needle = needle or _number_needle(flag, value)
    case(f"lora{flag}={value}", "lora", lambda c, f=flag, v=value: _lora(c, f, v), needle)
case("lora-prior-without-prompt", "lora", lambda c: _lora(c, "--with_prior_preservation"), "--class_prompt")
case("lora-stage-missing", "lora", lambda c: _lora(c, stage=c.tmp / "nope"), "does not exist")
case("lora-stage-is-file", "lora", lambda c: _lora(c, stage=_text(c, "f", b"x")), "is a file")
case("lora-stage-no-manifest", "lora", lambda c: _lora(c, stage=_folder(c, "s", {"x": b""})), "clif_manifest")
case("lora-stage-other-family", "lora", lambda c: _lora(c, stage=c.stage_xl), "family")
case("lora-stage-is-output-overwrite", "lora", lambda c: _lora(c, "--overwrite", stage=_ckpt_run(c)), "--stage_dir")
case("lora-manifest-family-number", "lora", lambda c: _lora(c, stage=c.manifest(lambda m: m.update(family=3))),
     "'family'")
case("lora-manifest-family-unknown", "lora",
     lambda c: _lora(c, stage=c.manifest(lambda m: m.update(family="sd3"))), "'family'")
case("lora-manifest-no-fingerprint", "lora",
     lambda c: _lora(c, stage=c.manifest(lambda m: m.pop("base_fingerprint"))), "base_fingerprint")
case("lora-manifest-concepts-string", "lora",
     lambda c: _lora(c, stage=c.manifest(lambda m: m.update(concepts="x"))), "'concepts'")
case("lora-manifest-name-escape", "lora",
     lambda c: _lora(c, stage=c.manifest(lambda m: m["concepts"][0].update(name="../../x"))), "file name")
case("lora-manifest-vectors-string", "lora",
     lambda c: _lora(c, stage=c.manifest(lambda m: m["concepts"][0].update(num_vectors="2"))), "'num_vectors'")
case("lora-manifest-not-json", "lora",
     lambda c: _lora(c, stage=_stage_file(c, "clif_manifest.json", b"{oops")), "invalid JSON")
case("lora-manifest-latin1", "lora",
     lambda c: _lora(c, stage=_stage_file(c, "clif_manifest.json", '{"stage": "é"}'.encode("latin-1"))), "UTF-8")
case("lora-embedding-truncated", "lora",
     lambda c: _lora(c, stage=_truncated(c, "embeddings/redball.safetensors")), "safetensors")
case("lora-embedding-garbage", "lora",
     lambda c: _lora(c, stage=_stage_file(c, "embeddings/redball.safetensors", b"garbage")), "safetensors")
case("lora-embedding-wrong-width", "lora", lambda c: _lora(c, stage=_stage_file(
    c, "embeddings/redball.safetensors", tensors={"<redball>": __import__("torch").zeros(2, 7)})), "shape")
case("lora-embedding-empty", "lora",
     lambda c: _lora(c, stage=_stage_file(c, "embeddings/redball.safetensors", b"")), "redball")
case("lora-stage-lora-garbage", "lora",
     lambda c: _lora(c, stage=_stage_file(c, "pytorch_lora_weights.safetensors", b"\x00" * 64)), "safetensors")


# ---- stage 3 Seg-Mix (--segmix_prob): a probability, two concepts or more, objects, a mask of every image
def _no_masks(c: Ctx) -> Path:
    root = c.copy(c.data, "set")
    shutil.rmtree(root / "masks")
    return root


for value in ("1.5", "-0.1", "nan", "often"):
    case(f"lora--segmix_prob={value}", "lora", lambda c, v=value: _lora(c, "--segmix_prob", v),
         _number_needle("--segmix_prob", value))
case("lora--segmix_background_weight=2", "lora", lambda c: _lora(c, "--segmix_prob", "0.5",
                                                               "--segmix_background_weight", "2"),
     "--segmix_background_weight: must be in [0, 1]")
case("lora--segmix_collages=0", "lora", lambda c: _lora(c, "--segmix_prob", "0.5", "--segmix_collages", "0"),
     "--segmix_collages: must be")
case("lora-segmix-one-concept", "lora",
     lambda c: [*_lora(c, "--segmix_prob", "0.5"), "--train_data_dir", str(c.concepts(lambda s: s["concepts"].pop()))],
     "needs at least two concepts")
case("lora-segmix-style", "lora", lambda c: _lora(c, "--segmix_prob", "0.5", "--learnable_property", "style"),
     "does not apply to --learnable_property style")
case("lora-segmix-no-masks-no-segmenter", "lora",
     lambda c: [*_lora(c, "--segmix_prob", "0.5", "--segmenter", str(c.tmp / "noseg"), "--cache_dir",
                       str(c.tmp / "cache")), "--train_data_dir", str(_no_masks(c))],
     "needs a mask of every image")

# ---- stage 1 flags
for flag, value in [("--num_pairs", "0"), ("--global_ratio", "nan"), ("--mix_ratio", "-1"), ("--num_views", "0"),
                    ("--text_encoder_rank", "0"), ("--text_encoder_lr", "nan"), ("--num_common_images", "0"),
                    ("--train_text_encoder", "whole")]:
    case(f"clif{flag}={value}", "clif", lambda c, f=flag, v=value: _clif(c, f, v), _number_needle(flag, value))
case("clif-clip-model-missing", "clif", lambda c: _clif(c, "--clip_model", str(c.tmp / "noclip")),
     "noclip does not exist")
case("clif-clip-model-2-missing", "clif",
     lambda c: _clif(c, "--clip_model_2", str(c.tmp / "noclip2"), model=c.xl), "--clip_model_2")
case("clif-segmenter-missing", "clif", lambda c: _clif(c, data=_no_masks(c)), "--segmenter")


def _no_masks(c: Ctx) -> Path:
    """The concept set without its masks: the segmenter (here --segmenter <tmp>/noseg) is needed."""
    root = c.concepts(lambda s: [x.pop("masks", None) for x in s["concepts"]])
    shutil.rmtree(root / "masks")
    return root
case("clif-cache-is-file", "clif", lambda c: [*_clif(c), "--cache_dir", str(_text(c, "cache", b"x"))], "is a file")
case("lora-class-dir-is-file", "lora", lambda c: _lora(c, "--with_prior_preservation", "--class_prompt", "a ball",
                                                       "--class_data_dir", str(_text(c, "cls", b"x"))), "is a file")
case("clif-data-missing", "clif", lambda c: _clif(c, data=c.tmp / "nope"), "does not exist")
case("clif-name-escape", "clif",
     lambda c: _clif(c, data=c.concepts(lambda s: s["concepts"][0].update(name="../x"))), "file name")

# ---- concept sets (through stage 2)
CONCEPT_EDITS = {
    "name-escape": (lambda s: s["concepts"][0].update(name="../../../escaped"), "file name"),
    "name-slash": (lambda s: s["concepts"][0].update(name="a/b"), "file name"),
    "name-dot": (lambda s: s["concepts"][0].update(name=".hidden"), "file name"),
    "name-empty": (lambda s: s["concepts"][0].update(name=""), "'name'"),
    "name-number": (lambda s: s["concepts"][0].update(name=5), "'name'"),
    "name-missing": (lambda s: s["concepts"][0].pop("name"), "'name'"),
    "token-number": (lambda s: s["concepts"][0].update(token=7), "'token'"),
    "token-list": (lambda s: s["concepts"][0].update(token=["<x>"]), "'token'"),
    "token-space": (lambda s: s["concepts"][0].update(token="<red ball>"), "one word"),
    "token-in-vocab": (lambda s: s["concepts"][0].update(token="dog"), "vocabulary"),
    "token-in-vocab-case": (lambda s: s["concepts"][0].update(token="Dog"), "vocabulary"),
    "token-case-collision": (lambda s: s["concepts"][1].update(token="<REDBALL>"), "collide"),
    "token-expanded-collision": (lambda s: s["concepts"][1].update(token="<redball>_1"), "collide"),
    "token-duplicate": (lambda s: s["concepts"][1].update(token="<redball>"), "duplicate token"),
    "name-duplicate": (lambda s: s["concepts"][1].update(name="redball"), "duplicate name"),
    "initializer-bool": (lambda s: s["concepts"][0].update(initializer=True), "'initializer'"),
    "initializer-two-words": (lambda s: s["concepts"][0].update(initializer="red ball"), "single word"),
    "initializer-multi-token": (lambda s: s["concepts"][0].update(initializer="zwxqv"), "need exactly 1"),
    "class-number": (lambda s: s["concepts"][0].update({"class": 3}), "'class'"),
    "images-number": (lambda s: s["concepts"][0].update(images=5), "'images'"),
    "images-missing-dir": (lambda s: s["concepts"][0].update(images="images/nothing"), "does not exist"),
    "images-is-file": (lambda s: s["concepts"][0].update(images="concepts.json"), "is a file"),
    "masks-list": (lambda s: s["concepts"][0].update(masks=["m"]), "'masks'"),
    "parts-string": (lambda s: s["concepts"][0].update(parts="ear"), "'parts'"),
    "parts-numbers": (lambda s: s["concepts"][0].update(parts=[1, 2]), "'parts'"),
    "vectors-string": (lambda s: s["concepts"][0].update(num_vectors="2"), "'num_vectors'"),
    "vectors-bool": (lambda s: s["concepts"][0].update(num_vectors=True), "'num_vectors'"),
    "vectors-float": (lambda s: s["concepts"][0].update(num_vectors=2.5), "'num_vectors'"),
    "vectors-zero": (lambda s: s["concepts"][0].update(num_vectors=0), "num_vectors"),
    "vectors-1000": (lambda s: s["concepts"][0].update(num_vectors=1000), "77 tokens"),
    **{f"repeats-{k}": (lambda s, v=v: s["concepts"][1].update(repeats=v), "repeats must be an integer from 1 to")
       for k, v in {"zero": 0, "negative": -2, "float": 2.0, "fraction": 2.5, "bool": True, "string": "3",
                    "null": None, "1001": 1001, "list": [2]}.items()},
    "num-repeats": (lambda s: s["concepts"][0].update(num_repeats=3), "write 'repeats'"),
    "concepts-object": (lambda s: s.update(concepts={"a": 1}), "'concepts'"),
    "concepts-empty": (lambda s: s.update(concepts=[]), "non-empty"),
    "concepts-number-entry": (lambda s: s.update(concepts=[5]), "not an object"),
    "concepts-missing": (lambda s: s.pop("concepts"), "'concepts'"),
    "top-level-list": (lambda s: b"[1, 2]", "top level"),
    "invalid-json": (lambda s: b"{not json", "invalid JSON"),
    "latin1": (lambda s: '{"concepts": [{"name": "café"}]}'.encode("latin-1"), "UTF-8"),
    "empty-file": (lambda s: b"", "invalid JSON"),
}
for key, (edit, needle) in CONCEPT_EDITS.items():
    case(f"concepts-{key}", "ti", lambda c, e=edit: _ti(c, data=c.concepts(e)), needle)
case("images-unreadable", "ti", lambda c: _ti(c, data=_image_edit(
    c, lambda d: min(d.iterdir()).write_bytes(b"not a png"))), "cannot read image")
case("images-1x1", "ti", lambda c: _ti(c, data=_image_edit(
    c, lambda d: Image.new("RGB", (1, 1)).save(min(d.iterdir())))), "1x1")
case("images-none", "ti", lambda c: _ti(c, data=_image_edit(
    c, lambda d: [p.unlink() for p in d.iterdir()])), "no images")
case("concepts-json-is-folder", "ti",
     lambda c: _ti(c, data=_json_folder(c)), "folder")
case("data-missing", "ti", lambda c: _ti(c, data=c.tmp / "nope"), "does not exist")
case("data-is-file", "ti", lambda c: _ti(c, data=_text(c, "data.txt", b"x")), "is a file")
case("data-empty", "ti", lambda c: _ti(c, data=_folder(c, "empty", {})), "is empty")
case("plain-no-class", "ti", lambda c: _ti(c, data=_plain(c, None)), "class word")
case("plain-classes-number", "ti", lambda c: _ti(c, data=_plain(c, b'{"thing": 5}')), "'thing'")
case("plain-classes-list", "ti", lambda c: _ti(c, data=_plain(c, b'["dog"]')), "top level")
case("plain-classes-latin1", "ti", lambda c: _ti(c, data=_plain(c, '{"thing": "é"}'.encode("latin-1"))), "UTF-8")
case("plain-repeats-unknown-concept", "ti", lambda c: _ti(c, data=_plain(c, b'{"thing": "dog"}', b'{"thng": 2}')),
     "no concept named 'thng'")
case("plain-repeats-zero", "ti", lambda c: _ti(c, data=_plain(c, b'{"thing": "dog"}', b'{"thing": 0}')),
     "repeats must be an integer")
case("plain-repeats-float", "ti", lambda c: _ti(c, data=_plain(c, b'{"thing": "dog"}', b'{"thing": 2.0}')),
     "repeats must be an integer")
case("plain-repeats-list", "ti", lambda c: _ti(c, data=_plain(c, b'{"thing": "dog"}', b"[2]")), "top level")
case("repeats-json-beside-concepts-json", "ti", lambda c: _ti(c, data=_with_repeats_json(c)),
     "set 'repeats' in concepts.json")
case("clif-repeats-zero", "clif", lambda c: _clif(c, data=c.concepts(lambda s: s["concepts"][0].update(repeats=0))),
     "repeats must be an integer")
for script, build in (("ti", _ti), ("lora", _lora), ("clif", _clif)):
    case(f"{script}-concept-balance-unknown", script, lambda c, b=build: b(c, "--concept_balance", "equal"),
         "--concept_balance: invalid choice")


def _json_folder(c: Ctx) -> Path:
    root = c.copy(c.data, "set")
    (root / "concepts.json").unlink()
    (root / "concepts.json").mkdir()
    return root


# ---- output dir, resume, model (stage 2)
case("out-is-file", "ti", lambda c: _ti(c, out=_text(c, "out.txt", b"x")), "is a file")
case("out-foreign-overwrite", "ti",
     lambda c: _ti(c, "--overwrite", out=_folder(c, "photos", {"checkpoint-notes.txt": b"n", "me.jpg": b"j"})),
     "not a CLIF run")
case("out-run-plus-foreign-overwrite", "ti", lambda c: _ti(c, "--overwrite", out=_with_file(_ckpt_run(c))),
     "not a CLIF run")
case("out-holds-run", "ti", lambda c: _ti(c, out=_ckpt_run(c)), "--overwrite")
case("out-is-data", "ti", lambda c: _ti(c, "--overwrite", out=c.data), "--train_data_dir")
case("out-inside-data", "ti", lambda c: _ti(c, out=c.data / "runs"), "--train_data_dir")
case("out-contains-data", "ti", lambda c: _ti(c, "--overwrite", data=c.copy(c.data, "set"), out=c.tmp), "contains")
case("out-is-model", "ti", lambda c: _ti(c, "--overwrite", out=c.sd), "--pretrained_model_name_or_path")
case("out-is-stage", "ti", lambda c: [*_ti(c, "--overwrite", out=c.stage), "--stage_dir", str(c.stage)],
     "--stage_dir")
case("resume-no-checkpoint", "ti", lambda c: _ti(c, "--resume_from_checkpoint", "latest"), "no checkpoint")
case("resume-not-a-checkpoint", "ti", lambda c: _ti(c, "--resume_from_checkpoint", str(c.data)),
     "not a checkpoint")
case("resume-other-vectors", "ti",
     lambda c: _ti(c, "--resume_from_checkpoint", "latest", "--num_vectors", "3", out=_ckpt_run(c)), "cannot resume")
case("resume-other-concepts", "ti", lambda c: _ti(c, "--resume_from_checkpoint", "latest", out=_ckpt_run(c),
                                                  data=c.concepts(lambda s: s["concepts"].pop())), "cannot resume")
case("resume-other-images", "ti",
     lambda c: _ti(c, "--resume_from_checkpoint", "latest", out=_ckpt_run(c), data=_other_images(c)), "images differ")
case("resume-other-repeats", "ti",
     lambda c: _ti(c, "--resume_from_checkpoint", "latest", out=_ckpt_run(c),
                   data=c.concepts(lambda s: s["concepts"][1].update(repeats=2))), "repeats 1, this run has 2")
case("resume-other-balance", "ti",
     lambda c: _ti(c, "--resume_from_checkpoint", "latest", "--concept_balance", "images", out=_ckpt_run(c)),
     "--concept_balance concepts, this run has images")
case("resume-other-lr", "ti",
     lambda c: _ti(c, "--resume_from_checkpoint", "latest", "--learning_rate", "0.5", out=_ckpt_run(c)),
     "--learning_rate")
case("model-missing", "ti", lambda c: ti_args(c.tmp / "nomodel", c.data, c.out), "does not exist")
case("model-not-pipeline", "ti", lambda c: ti_args(_folder(c, "m", {"x": b""}), c.data, c.out), "model_index")
case("model-offline-hub", "ti", lambda c: ti_args("someorg/somemodel", c.data, c.out), "someorg/somemodel")
case("report-to-wandb", "ti", lambda c: _ti(c, "--report_to", "wandb"), "wandb")
case("nan-loss-ti", "ti", lambda c: _ti(c, "--noise_offset", "1e39"), "not finite", 1)
case("nan-loss-lora", "lora", lambda c: _lora(c, "--noise_offset", "1e39"), "not finite", 1)


def _with_file(run: Path) -> Path:
    (run / "my_notes.txt").write_text("mine")
    return run


# ---- inference
for flag, value in [("--num_inference_steps", "0"), ("--num_images_per_prompt", "-1"), ("--batch_size", "0"),
                    ("--height", "60"), ("--width", "0"), ("--guidance_scale", "nan"), ("--guidance_scale", "inf"),
                    ("--guidance_scale", "-1"), ("--lora_scale", "nan"), ("--seed", "-1"), ("--seed", str(2**64)),
                    ("--scheduler", "magic"), ("--dtype", "fp8")]:
    needle = "multiple of 8" if value == "60" else _number_needle(flag, value)
    case(f"inf{flag}={value}", "inf", lambda c, f=flag, v=value, n=needle: _inf(c, f, v), needle)
case("inf-no-prompt", "inf", lambda c: _inf(c, prompt=False), "no prompt")
case("inf-prompts-missing", "inf", lambda c: _inf(c, "--prompts_file", str(c.tmp / "p.txt")), "does not exist")
case("inf-prompts-folder", "inf", lambda c: _inf(c, "--prompts_file", str(_folder(c, "p", {}))), "folder")
case("inf-prompts-latin1", "inf",
     lambda c: _inf(c, "--prompts_file", str(_text(c, "p.txt", "café".encode("latin-1")))), "UTF-8")
case("inf-prompts-json-object", "inf",
     lambda c: _inf(c, "--prompts_file", str(_text(c, "p.json", b'{"a": 1}'))), "a list")
case("inf-prompts-json-numbers", "inf",
     lambda c: _inf(c, "--prompts_file", str(_text(c, "p.json", b"[1, 2]"))), "prompt strings")
case("inf-prompts-json-invalid", "inf",
     lambda c: _inf(c, "--prompts_file", str(_text(c, "p.json", b"[1, "))), "invalid JSON")
case("inf-set-without-stage", "inf", lambda c: _inf(c, "--prompt_set", "single"), "--stage_dir")
for key, template in [("index", "{0} and {2}"), ("named", "{0} by {name}"), ("unbalanced", "{0"),
                      ("no-slot", "a photo"), ("attribute", "{0.x}")]:
    case(f"inf-template-{key}", "inf", lambda c, t=template: _inf(c, "--stage_dir", str(c.stage), "--prompt_set",
                                                                    str(_text(c, "t.txt", t.encode()))), "template")
case("inf-set-missing", "inf", lambda c: _inf(c, "--stage_dir", str(c.stage), "--prompt_set", "nonesuch"),
     "does not exist")
case("inf-stage-missing", "inf", lambda c: _inf(c, "--stage_dir", str(c.tmp / "nope")), "does not exist")
case("inf-stage-no-manifest", "inf", lambda c: _inf(c, "--stage_dir", str(_folder(c, "s", {}))), "clif_manifest")
case("inf-stage-family", "inf", lambda c: _inf(c, "--stage_dir", str(c.stage_xl)), "family")
case("inf-stage-truncated", "inf",
     lambda c: _inf(c, "--stage_dir", str(_truncated(c, "embeddings/bluebox.safetensors"))), "safetensors")
case("inf-stage-wrong-width", "inf", lambda c: _inf(c, "--stage_dir", str(_stage_file(
    c, "embeddings/redball.safetensors", tensors={"<redball>": __import__("torch").zeros(2, 5)}))), "shape")
case("inf-stage-lora-truncated", "inf", lambda c: _inf(c, "--stage_dir", str(_stage_file(
    c, "pytorch_lora_weights.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"))), "safetensors")
case("inf-manifest-missing-key", "inf",
     lambda c: _inf(c, "--stage_dir", str(c.manifest(lambda m: m.pop("stage")))), "'stage'")
case("inf-out-holds-files", "inf", lambda c: _inf_out(c), "already holds")
# prompts with two concepts: regions and isolated encoding
TWO = "a <redball> on the left and a <bluebox> on the right"
for key, box, needle in [("malformed", "<redball>=0,0,0.5", "four numbers"), ("no-eq", "<redball>", "TOKEN=x0"),
                         ("nan", "<redball>=0,0,nan,1", "four numbers"), ("range", "<redball>=0,0,1.5,1", "[0, 1]"),
                         ("zero-area", "<redball>=0.5,0,0.5,1", "no area"),
                         ("unknown", "<dog>=0,0,0.5,1", "not a concept")]:
    case(f"inf-box-{key}", "inf", lambda c, b=box: _inf(c, "--stage_dir", str(c.stage), "--prompt", TWO,
                                                         "--region_box", b), needle)
case("inf-box-not-named", "inf", lambda c: _inf(c, "--stage_dir", str(c.stage), "--region_box",
                                                 "<bluebox>=0,0,0.5,1"), "no prompt names <bluebox>")
case("inf-box-partial", "inf", lambda c: _inf(c, "--stage_dir", str(c.stage), "--prompt", TWO, "--region_box",
                                               "<redball>=0,0,0.5,1"), "give <bluebox> a box")
case("inf-box-twice", "inf", lambda c: _inf(c, "--stage_dir", str(c.stage), "--prompt", TWO, "--region_box",
                                             "<redball>=0,0,0.5,1", "--region_box", "<redball>=0,0,1,1"), "two boxes")
for flag, value in [("--isolate_weight", "1.5"), ("--isolate_weight", "-0.1"), ("--isolate_weight", "nan"),
                    ("--region_strength", "2"), ("--region_steps", "0.5:0.2"), ("--region_steps", "0:2"),
                    ("--region_steps", "half"), ("--isolate", "cut"), ("--region_prompt", "other")]:
    needle = f"{flag}: invalid choice" if flag in ("--isolate", "--region_prompt") else f"{flag}:"
    case(f"inf{flag}={value}", "inf", lambda c, f=flag, v=value: _inf(c, "--prompt", TWO, f, v), needle)
case("inf-out-is-file", "inf", lambda c: [*_inf(c)[:3], str(_text(c, "o", b"x")), *_inf(c)[4:]], "is a file")
case("inf-out-is-stage", "inf", lambda c: [*_inf(c, "--overwrite", "--stage_dir", str(c.stage))[:3], str(c.stage),
                                           *_inf(c, "--overwrite", "--stage_dir", str(c.stage))[4:]], "--stage_dir")
case("inf-model-offline-hub", "inf", lambda c: ["--pretrained_model_name_or_path", "someorg/somemodel",
                                                "--prompt", "x", "--output_dir", str(c.out)], "someorg/somemodel")
case("inf-model-missing", "inf", lambda c: ["--pretrained_model_name_or_path", str(c.tmp / "nomodel"),
                                            "--prompt", "x", "--output_dir", str(c.out)], "does not exist")


def _inf_out(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "old.png").write_bytes(b"x")
    return _inf(c)


# ---- evaluate
for flag, value in [("--detector_threshold", "nan"), ("--confusion_margin", "nan"), ("--confusion_margin", "-1"),
                    ("--batch_size", "0"), ("--detector_threshold", "-0.5")]:
    case(f"eval{flag}={value}", "eval", lambda c, f=flag, v=value: _ev(c, f, v), _number_needle(flag, value))
case("eval-images-missing", "eval", lambda c: _ev(c, images=c.tmp / "nope"), "does not exist")
case("eval-images-is-file", "eval", lambda c: _ev(c, images=_text(c, "i", b"x")), "is a file")
case("eval-images-empty", "eval", lambda c: _ev(c, images=_folder(c, "e", {})), "no images")
case("eval-no-sidecar", "eval", lambda c: _ev(c, images=_gen_with(c)), "has no prompt")
case("eval-sidecar-invalid", "eval", lambda c: _ev(c, images=_gen_with(c, sidecar=b"{")), "invalid JSON")
case("eval-sidecar-number", "eval", lambda c: _ev(c, images=_gen_with(c, sidecar=b'{"prompt": 5}')), "'prompt'")
case("eval-sidecar-no-prompt", "eval", lambda c: _ev(c, images=_gen_with(c, sidecar=b'{"seed": 1}')), "'prompt'")
case("eval-sidecar-list", "eval", lambda c: _ev(c, images=_gen_with(c, sidecar=b'["a"]')), "top level")
case("eval-sidecar-latin1", "eval",
     lambda c: _ev(c, images=_gen_with(c, sidecar='{"prompt": "é"}'.encode("latin-1"))), "UTF-8")
case("eval-prompts-json-list", "eval", lambda c: _ev(c, images=_gen_with(c, prompts=b'["a.png"]')), "top level")
case("eval-prompts-json-number", "eval",
     lambda c: _ev(c, images=_gen_with(c, prompts=b'{"a.png": 3}')), "'a.png'")
case("eval-labels-count", "eval", lambda c: _ev(c, "--labels", "a", "b"), "--labels")
case("eval-labels-duplicate", "eval", lambda c: [*_ev(c), "--images", str(c.gen), str(c.gen)], "--labels")
case("eval-concepts-missing", "eval", lambda c: _ev(c, concepts=c.tmp / "nope"), "does not exist")
case("eval-concepts-invalid", "eval",
     lambda c: _ev(c, concepts=c.concepts(lambda s: b"{")), "invalid JSON")
case("eval-concepts-escape", "eval",
     lambda c: _ev(c, concepts=c.concepts(lambda s: s["concepts"][0].update(name="../x"))), "file name")
case("eval-out-holds-files", "eval", lambda c: _ev_out(c), "already holds")
case("eval-out-is-images", "eval", lambda c: ["--images", str(c.gen), "--concepts", str(c.data), "--output_dir",
                                              str(c.gen), "--overwrite"], "--images")
case("eval-out-is-file", "eval", lambda c: [*_ev(c)[:4], "--output_dir", str(_text(c, "o", b"x")), *_ev(c)[6:]],
     "is a file")
case("eval-image-corrupt", "eval", lambda c: _ev(c, images=_corrupt_gen(c)), "b.png")
case("eval-clip-unknown", "eval", lambda c: _ev(c, "--clip_model", "ViT-Nope-99"), "open_clip")


def _corrupt_gen(c: Ctx) -> Path:
    """An image folder whose second PNG cannot be decoded (its sidecar is fine)."""
    return _folder(c, "gen2", {"a.png": _png(), "a.json": b'{"prompt": "a"}', "b.png": b"\x89PNG not really",
                               "b.json": b'{"prompt": "b"}'})


def _ev_out(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "metrics.json").write_text("{}")
    return _ev(c)


# ---- counts of the toy world's commands: each bounded, and the one line states the bound
TOY_COUNTS = {  # command -> (flag, cap)
    "experiment": [("--clif_steps", 10**6), ("--ti_steps", 10**6), ("--lora_steps", 10**6),
                   ("--images_per_prompt", 1000), ("--inference_steps", 1000), ("--gate_captions", 10**5),
                   ("--referee_scenes", 10**6), ("--referee_steps", 10**6), ("--threads", 1024), ("--jobs", 256)],
    "gate": [("--captions", 10**5), ("--referee_scenes", 10**6), ("--referee_steps", 10**6), ("--threads", 1024)],
    "pretrain": [("--checkpoint_every", 10**6), ("--unet_steps", 10**7), ("--threads", 1024)],
}


def _toy(c: Ctx, cmd: str, *extra) -> list[str]:
    required = {"experiment": ["--base", str(c.tmp / "base")], "gate": ["--base", str(c.tmp / "base"), "--referee",
                                                                         str(c.tmp / "referee")], "pretrain": []}
    return [cmd, *required[cmd], "--out", str(c.out), *extra]


for cmd, flags in TOY_COUNTS.items():
    for flag, cap in flags:
        for value in ("0", str(cap + 1), "100000000", "-3"):
            case(f"toy-{cmd}{flag}={value}", "toy", lambda c, a=cmd, f=flag, v=value: _toy(c, a, f, v),
                 f"{flag}: must be in [1, {cap}], got {value}")
        case(f"toy-{cmd}{flag}=1.5", "toy", lambda c, a=cmd, f=flag: _toy(c, a, f, "1.5"),
             f"{flag}: expected an integer")
for cmd, flag in [("experiment", "--seeds"), ("pretrain", "--seed")]:
    case(f"toy-{cmd}{flag}=-1", "toy", lambda c, a=cmd, f=flag: _toy(c, a, f, "-1"), f"{flag}: must be in [0, ")
    case(f"toy-{cmd}{flag}=2**63", "toy", lambda c, a=cmd, f=flag: _toy(c, a, f, str(2**63)), f"{flag}: must be")
case("toy-experiment-rung-unknown", "toy", lambda c: _toy(c, "experiment", "--rungs", "distinct", "nonesuch"),
     "--rungs: 'nonesuch' is not in")
case("toy-experiment--seeds-one-bad", "toy", lambda c: _toy(c, "experiment", "--seeds", "0", "x"), "--seeds: expected")
case("toy-pretrain--unet_stop_at=-1", "toy", lambda c: _toy(c, "pretrain", "--unet_stop_at", "-1"),
     "--unet_stop_at: must be in [0, 10000000], got -1")
case("toy-pretrain--unet_stop_at-huge", "toy", lambda c: _toy(c, "pretrain", "--unet_stop_at", "100000000"),
     "--unet_stop_at: must be in [0, 10000000]")
case("toy-unknown-command", "toy", lambda c: ["train"], "invalid choice")


def _rungs_images(c: Ctx, n) -> Path:
    """A rungs file whose first concept asks for `n` training renders."""
    return _text(c, "rungs.json", json.dumps({"rungs": {"r": {"a_a": {"class": "ball", "color": "red", "images": n},
                                                              "b_b": {"class": "box", "color": "blue"}}}}).encode())


for n, shown in [(100000000, "100000000"), (1001, "1001"), (0, "0"), (True, "true")]:
    case(f"toy-rungs-images={shown}", "toy",
         lambda c, k=n: _toy(c, "experiment", "--rungs_file", str(_rungs_images(c, k))),
         f"concept 'a_a': images must be an integer from 1 to 1000 (training renders), got {shown}")

# ---- the leak probe's command line
case("leak-no-base", "leak", lambda c: ["--words", "a=x", "b=y"], "--base")
case("leak-one-word", "leak", lambda c: ["--base", str(c.sd), "--words", "a=x"], "--words: give two or more")
case("leak-empty-words", "leak", lambda c: ["--base", str(c.sd), "--words", "a=", "b=y"], "--words: give two or more")
case("leak-no-name", "leak", lambda c: ["--base", str(c.sd), "--words", "=x", "b=y"], "--words: give two or more")
# ---- the toy-world concept-set writer (python -m clif.toyworld concepts), the demo's referee and summary
def _concepts(c: Ctx, *extra) -> list[str]:
    return ["concepts", "--out", str(c.out), *extra]


def _pair(a: str, b: str = "b=blue,box") -> list[str]:
    return ["--concept", a, "--concept", b]


def _toy_set(c: Ctx) -> Path:
    """A toy-world set as `concepts` writes it (one render a concept)."""
    toyworld_main(["concepts", "--rung", "distinct", "--out", str(c.tmp / "toyset"), "--images", "1", "--common", "1"])
    return c.tmp / "toyset"


def _rungs(c: Ctx, color: str) -> str:
    return str(_text(c, "rungs.json", json.dumps(
        {"rungs": {"r": {"a": {"class": "ball", "color": color}, "b": {"class": "box", "color": "blue"}}}}).encode()))


case("toy-rung-unknown", "toy", lambda c: _concepts(c, "--rung", "nonesuch"), "'nonesuch' is not in")
case("toy-rung-and-concepts", "toy", lambda c: _concepts(c, "--rung", "distinct", *_pair("a=red,ball")), "either --rung")
case("toy-no-concepts", "toy", lambda c: _concepts(c), "either --rung or --concept")
case("toy-colour-unknown", "toy", lambda c: _concepts(c, *_pair("a=pink,ball")), "color 'pink' is not in the world")
case("toy-colour-unknown-rungs-file", "toy", lambda c: _concepts(c, "--rungs_file", _rungs(c, "pink"), "--rung", "r"),
     "color 'pink' is not in the world")
case("toy-class-unknown", "toy", lambda c: _concepts(c, *_pair("a=red,cube")), "class 'cube' is not in the world")
case("toy-mark-unknown", "toy", lambda c: _concepts(c, *_pair("a=red,ball,stripe,blue")), "mark 'stripe'")
case("toy-concept-no-class", "toy", lambda c: _concepts(c, *_pair("a=red")), "NAME=COLOR,CLASS")
case("toy-concept-twice", "toy", lambda c: _concepts(c, *_pair("a=red,ball", "a=red,ball")), "twice")
case("toy-concept-alone", "toy", lambda c: _concepts(c, "--concept", "a=red,ball"), "two or more concepts")
case("toy-concepts-same-object", "toy", lambda c: _concepts(c, *_pair("a=red,ball", "b=red,ball")), "same object")
case("toy-concept-name-upper", "toy", lambda c: _concepts(c, *_pair("A=red,ball")), "lower-case")
case("toy-rungs-file-missing", "toy", lambda c: _concepts(c, "--rungs_file", str(c.tmp / "no.json"), "--rung", "r"),
     "cannot read")
case("toy-out-exists", "toy", lambda c: ["concepts", "--out", str(_folder(c, "set", {})), "--rung", "distinct"],
     "already exists")
case("toy-out-is-file", "toy", lambda c: ["concepts", "--out", str(_text(c, "o", b"x")), "--rung", "distinct"],
     "already exists")
case("toy-images-0", "toy", lambda c: _concepts(c, "--rung", "distinct", "--images", "0"), "--images: must be")
case("toy-size-60", "toy", lambda c: _concepts(c, "--rung", "distinct", "--size", "60"), "multiple of 8")
case("toy-referee-set-not-toyworld", "toy", lambda c: ["referee", "--images", str(c.gen), "--concepts", str(c.data),
                                                       "--out", str(c.tmp / "r.json")], "toyworld.json")
case("toy-referee-no-images", "toy", lambda c: ["referee", "--images", str(_folder(c, "none", {})), "--concepts",
                                                str(_toy_set(c)), "--out", str(c.tmp / "r.json")], "no images")
case("toy-referee-missing", "toy", lambda c: ["referee", "--images", str(c.gen), "--concepts", str(_toy_set(c)),
                                              "--out", str(c.tmp / "r.json"), "--referee", str(c.tmp / "no")],
     "no referee.safetensors")
case("toy-summary-not-a-demo", "toy", lambda c: ["summary", str(c.tmp)], "run the demo")


try:
    import bitsandbytes  # noqa: F401
except ImportError:
    case("ti-8bit-adam", "ti", lambda c: _ti(c, "--use_8bit_adam"), "bitsandbytes")

# ---- --torch_compile (issue 18): what the compiled step cannot serve is refused before anything is written
case("ti-compile-mode-alone", "ti", lambda c: _ti(c, "--compile_mode", "max-autotune-no-cudagraphs"),
     "needs --torch_compile")
case("lora-compile-mode-unknown", "lora", lambda c: _lora(c, "--torch_compile", "--compile_mode", "fast"),
     "invalid choice")
if not torch.cuda.is_available():
    case("ti-compile-cuda-graphs-on-cpu", "ti", lambda c: _ti(c, "--torch_compile", "--compile_mode",
                                                                "reduce-overhead"), "needs a CUDA device")


@pytest.fixture(scope="module")
def world(tiny_sd15, tiny_sdxl, concept_set, tmp_path_factory) -> World:
    return World(tiny_sd15, tiny_sdxl, concept_set, tmp_path_factory.mktemp("world"))


def _snapshot(paths: list[Path]) -> dict:
    out = {}
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for p in files:
            st = p.stat() if p.exists() else None
            out[str(p)] = st and (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_corpus_is_large_enough():
    assert len(CASES) >= 150, len(CASES)
    assert {s for s, *_ in CASES.values()} == set(MAINS)


@pytest.mark.parametrize("cid", list(CASES))
def test_bad_input(cid, world, tmp_path, capsys):
    script, build, needle, code = CASES[cid]
    c = Ctx(world, tmp_path)
    argv = build(c)
    shared = world.built()
    before, shared_before = _snapshot([tmp_path]), _snapshot(shared)
    got, err = run_cli(MAINS[script], argv, capsys)
    lines = err.strip().splitlines()
    assert got == code, f"exit {got}, stderr: {err[-2000:]}"
    assert "Traceback" not in err
    if code == 2:  # refused before anything was written
        assert len(lines) == 1, err
        assert _snapshot([tmp_path]) == before, "a refused run changed the file system"
    else:  # stopped while training: progress may precede the one error line; no finished-looking output
        assert sum("error:" in ln for ln in lines) == 1 and "error:" in lines[-1], err
        assert not (c.out / "clif_manifest.json").exists()
    assert _snapshot(shared) == shared_before, "an input was changed"
    assert needle.lower() in lines[-1].lower(), lines[-1]


def test_sixteen_bit_png_is_decoded(tmp_path):
    from clif.concepts import open_rgb

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(open_rgb(tmp_path / "g16.png")).astype(float)
    assert rgb.shape == (64, 64, 3) and 120 < rgb.mean() < 135  # a ramp, not 99.6 % white
    assert rgb.min() == 0 and rgb.max() == 255


def test_offline_hub_id_is_one_line_in_a_real_process(tmp_path):
    """Warnings of the hub client go to stderr only outside pytest's capture: check in a subprocess."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "inference.py", "--pretrained_model_name_or_path", "someorg/somemodel",
                        "--prompt", "x", "--output_dir", str(tmp_path / "o")], check=False, cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "HF_HUB_OFFLINE" in r.stderr and not (tmp_path / "o").exists()


def test_unreadable_image_folder_is_one_line(world, tmp_path, capsys, monkeypatch):
    """A concept's image folder the user may not list (chmod 000 as a user without root's bypass): one line, exit 2.
    Root reads through chmod 000, so there the listing is made to fail as it would for such a user."""
    import errno
    import os

    data = Ctx(world, tmp_path).copy(world.data, "set")
    locked = data / "images" / "redball"
    locked.chmod(0)
    try:
        if os.geteuid() == 0:
            real = Path.iterdir

            def iterdir(self):
                if self == locked:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
                return real(self)

            monkeypatch.setattr(Path, "iterdir", iterdir)
        got, err = run_cli(train_ti.main, ti_args(world.sd, data, tmp_path / "out"), capsys)
    finally:
        locked.chmod(0o755)
    lines = err.strip().splitlines()
    assert got == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot read" in lines[0] and "redball" in lines[0] and "ermission" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_model_load_failure_is_one_line_in_a_real_process(tmp_path):
    """open_clip logs a failed weight download at ERROR (root logger, stderr) before it raises: the loading guard
    silences it, so stderr holds the one error line. A subprocess, since pytest captures log records itself."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import logging, sys\nfrom clif import cli\nfrom clif.errors import loading\n"
            "with cli.user_errors('x'):\n    with loading('CLIP model', 'ViT-B-32', errors=(RuntimeError,)):\n"
            "        logging.getLogger().error('Failed to download weights')\n        raise RuntimeError('no weights')\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot load CLIP model 'ViT-B-32': no weights" in r.stderr


def _word_named(c: Ctx) -> Path:
    """The concept set with its first concept named 'cat' (one token of CLIP's vocabulary)."""
    return c.concepts(lambda s: s["concepts"][0].update(name="cat", images="images/redball", masks="masks/redball"))


case("ti-word-name", "ti", lambda c: _ti(c, data=_word_named(c)), "--allow_word_names")
case("lora-word-name", "lora", lambda c: [*_lora(c), "--train_data_dir", str(_word_named(c))], "'cat'")


def test_word_name_is_accepted_with_a_warning(world, tmp_path, capsys):
    data = _word_named(Ctx(world, tmp_path))
    out = tmp_path / "out"
    got, err = run_cli(train_ti.main, ti_args(world.sd, data, out, "--max_train_steps", "1", "--allow_word_names"),
                       capsys)
    assert got == 0, err
    assert "warning: concept name(s) 'cat'" in err and (out / "embeddings" / "cat.safetensors").is_file()


def test_checks_that_need_no_weights_come_before_loading(world, tmp_path, capsys, monkeypatch):
    """Token in the vocabulary, the stage dir's family and embedding width are read from the manifest, tokenizer and
    config files: a mistake is answered before any weights load (minutes on SDXL)."""
    import diffusers

    import clif.train.stage

    c = Ctx(world, tmp_path)
    runs = {  # built before the loaders are disabled
        "vocabulary": ("ti", _ti(c, data=c.concepts(lambda s: s["concepts"][0].update(token="photo")))),
        "family": ("lora", _lora(c, stage=c.stage_xl)),
        "shape": ("lora", _lora(c, stage=_stage_file(c, "embeddings/redball.safetensors",
                                                     tensors={"<redball>": __import__("torch").zeros(2, 5)}))),
    }
    runs["inference shape"] = ("inf", _inf(c, "--stage_dir", runs["shape"][1][runs["shape"][1].index("--stage_dir") + 1]))

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(clif.train.stage, "load_model", no_weights)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_weights)
    for what, (script, argv) in runs.items():
        got, err = run_cli(MAINS[script], argv, capsys)
        assert got == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (what, err)
        assert what.split()[-1] in err or (what == "vocabulary" and "already in the tokenizer" in err), (what, err)


# ---- evaluate.py: every model is checked before any loads. A mistyped path names its flag; offline, a hub model that
# is not cached names itself and the flags that do without it (a bogus detector used to be answered by the D&C model)
@pytest.fixture(scope="module")
def eval_models(world) -> dict[str, Path]:
    from clif.fixtures.tiny import build_dinov2, build_openclip, build_owlv2

    root = world.root / "eval_models"
    return {"clip": build_openclip(root / "oc"), "owl": build_owlv2(root / "owl"), "dc": build_dinov2(root / "dv2")}


def _ev_models(world, out: Path, m: dict, *, clip=True, owl=True, dc=True, extra=()) -> list[str]:
    """evaluate.py with every model valid (the tiny local ones), but those switched off: left at their defaults."""
    return ["--images", str(world.gen), "--concepts", str(world.data), "--output_dir", str(out),
            *(["--clip_model", f"local-dir:{m['clip']}"] if clip else []),
            *(["--detector", str(m["owl"])] if owl else []), *(["--dc_model", str(m["dc"])] if dc else []), *extra]


OWL, DINOV2 = "google/owlv2-base-patch16-ensemble", "facebook/dinov2-base"
EVAL_MODEL_CASES = {  # id -> (flags of _ev_models, what the one line must say)
    "bogus-detector-path-dc-on": ({"owl": False, "extra": ["--detector", "/nonexistent/owl"]},
                                  ["--detector /nonexistent/owl does not exist"]),
    "bogus-detector-path-default-dc-offline": ({"owl": False, "dc": False, "extra": ["--detector", "/nonexistent/owl"]},
                                               ["--detector /nonexistent/owl does not exist"]),
    "default-detector-offline": ({"owl": False}, [f"cannot load detector '{OWL}'", "--detector none"]),
    "bogus-dc-model": ({"dc": False, "extra": ["--dc_model", "/nonexistent/dinov2"]},
                       ["--dc_model /nonexistent/dinov2 does not exist"]),
    "default-dc-model-offline": ({"dc": False}, [f"cannot load D&C feature model '{DINOV2}'",
                                                  "--metrics clip confusion"]),
    "bogus-dino-path": ({"extra": ["--dino", "/nonexistent/dino"]}, ["--dino /nonexistent/dino does not exist"]),
    "hub-dino-offline": ({"extra": ["--dino", "facebook/dino-vits16"]},
                         ["cannot load DINO model 'facebook/dino-vits16'", "--dino"]),
    "bogus-clip-local-dir": ({"clip": False, "extra": ["--clip_model", "local-dir:/nonexistent/oc"]},
                             ["--clip_model local-dir:/nonexistent/oc does not exist"]),
    "default-clip-offline": ({"clip": False}, ["cannot load CLIP model 'ViT-B-32'", "give --clip_model a local"]),
    "named-hub-before-default-offline": ({"clip": False, "extra": ["--dino", "facebook/dino-vits16"]},
                                         ["cannot load DINO model 'facebook/dino-vits16'"]),
    "named-path-before-default-offline": (
        {"clip": False, "owl": False, "dc": False, "extra": ["--dc_model", "./no/dv2"]},
        ["--dc_model ./no/dv2 does not exist"]),
}


@pytest.fixture
def empty_hub_cache(tmp_path_factory, monkeypatch):
    """Offline, with a hub cache that holds nothing: whatever this machine has cached."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub")))
    return Path(huggingface_hub.constants.HF_HUB_CACHE)


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The models evaluate.py loads, in order (the real loaders run)."""
    from clif.eval import backbones, dc  # what clif.eval.backbones.open_models calls

    seen: list[str] = []
    for owner, attr in [(backbones, "open_backbone"), (backbones, "Detector"), (backbones, "Dino"),
                        (dc, "open_dc_model")]:
        real = getattr(owner, attr)
        monkeypatch.setattr(owner, attr, lambda *a, _r=real, _n=attr, **k: (seen.append(_n), _r(*a, **k))[1])
    return seen


def test_evaluate_models_all_valid_load(world, eval_models, empty_hub_cache, loads, tmp_path, capsys):
    """The control of the cases below: with every model valid the run goes through, loading each."""
    code, err = run_cli(evaluate.main, _ev_models(world, tmp_path / "out", eval_models), capsys)
    assert code == 0, err
    assert sorted(loads) == ["Detector", "open_backbone", "open_dc_model"]


@pytest.mark.parametrize("cid", list(EVAL_MODEL_CASES))
def test_evaluate_models_checked_before_loading(cid, world, eval_models, empty_hub_cache, loads, tmp_path, capsys):
    flags, needles = EVAL_MODEL_CASES[cid]
    argv = _ev_models(world, tmp_path / "out", eval_models, **flags)
    before = _snapshot([tmp_path])
    code, err = run_cli(evaluate.main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert loads == [], f"{loads} loaded before the check"
    assert _snapshot([tmp_path]) == before


def test_cached_hub_model_passes_the_offline_check(empty_hub_cache):
    """A hub id whose files are in the cache passes offline; the same id without them is refused."""
    from clif.validate import ModelSource, check_models

    m = ModelSource("--detector", "someorg/owl", "detector", "give --detector a local folder")
    with pytest.raises(UserError, match="cannot load detector 'someorg/owl'.*give --detector a local folder"):
        check_models([m])
    repo = empty_hub_cache / "models--someorg--owl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    check_models([m])
