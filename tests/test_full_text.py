"""Stage 1 --train_text_encoder full: the whole text encoder trains, is saved as text_encoder*/ folders that stock
transformers/diffusers load, stages 2 and 3 load it frozen and pass it on, inference uses it, a resume is
bit-identical and the kohya/A1111 export (a LoRA file) is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from conftest import load_embedding, lora_args, run_cli, ti_args
from PIL import Image
from safetensors.torch import load_file
from test_clif import clif_args, segmenter_dir  # noqa: F401  (fixture)

import inference
import train_clif
import train_lora
import train_ti

PROMPT = "a <redball> next to a <bluebox>"
ENCODERS = {"sd15": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


def full_stage1(model, data, out, seg, cache, *extra):
    train_clif.main(
        clif_args(
            model,
            data,
            out,
            seg,
            cache,
            "--train_text_encoder",
            "full",
            "--text_encoder_lr",
            "1e-2",
            "--learning_rate",
            "1e-1",
            *extra,
        )
    )


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.heavy(16)
def test_full_text_encoder_chain(family, tiny_models, concept_set, segmenter_dir, tmp_path, capsys):  # noqa: F811
    from diffusers import DiffusionPipeline

    model = tiny_models[family]
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    full_stage1(model, concept_set, s1, segmenter_dir, tmp_path / "c")
    base = DiffusionPipeline.from_pretrained(model)
    for name in ENCODERS[family]:
        # the stock loader reads the folder; the base vocabulary only (the concept rows stay in embeddings/)
        enc = getattr(transformers, json.loads((s1 / name / "config.json").read_text())["architectures"][0])
        trained, orig = enc.from_pretrained(s1 / name).state_dict(), getattr(base, name).state_dict()
        assert set(trained) == set(orig)
        changed = [k for k in trained if not torch.equal(trained[k].float(), orig[k].float())]
        assert changed and not any("token_embedding" in k for k in changed)  # the layers trained, not the vocab
    # stage 2 loads it frozen and passes it on unchanged; stage 3 too
    train_ti.main(ti_args(model, concept_set, s2, "--stage_dir", str(s1), "--max_train_steps", "2"))
    train_lora.main(lora_args(model, concept_set, s2, s3, "--max_train_steps", "2"))
    # stage 2 trains against it: the same run on the stage-1 dir without its encoders sees other losses
    bare = tmp_path / "s1-without-encoder"
    _without_encoders(s1, bare, family)
    train_ti.main(ti_args(model, concept_set, tmp_path / "s2-bare", "--stage_dir", str(bare), "--max_train_steps", "2"))
    losses = [json.loads((d / "run_stats.json").read_text())["losses"] for d in (s2, tmp_path / "s2-bare")]
    assert losses[0] != losses[1]
    for stage in (s2, s3):
        for name in ENCODERS[family]:
            assert (stage / name / "model.safetensors").read_bytes() == (s1 / name / "model.safetensors").read_bytes()
    card = (s3 / "README.md").read_text()
    assert 'from_pretrained("<this folder>/text_encoder"' in card and "A1111 / ComfyUI / kohya: not supported" in card
    # inference.py uses it: the same stage dir without its encoder folders draws something else
    def gen(stage, out):
        return ["--pretrained_model_name_or_path", str(model), "--stage_dir", str(stage), "--prompt", PROMPT,
                "--regions", "none", "--num_images_per_prompt", "1", "--num_inference_steps", "3", "--output_dir",
                str(out)]  # the plain path, as stock diffusers draws it

    no_te = tmp_path / "s3-without-encoder"
    _without_encoders(s3, no_te, family)
    half = json.loads((no_te / "clif_manifest.json").read_text())
    half["files"]["text_encoder"] = ENCODERS[family]  # a manifest that names folders no longer there
    (no_te / "clif_manifest.json").write_text(json.dumps(half))
    code, err = run_cli(inference.main, gen(no_te, tmp_path / "refused"), capsys)
    assert code == 2 and "text_encoder/model.safetensors is missing" in err
    _without_encoders(s3, no_te, family, replace=True)
    images = {}
    for stage in (s3, no_te):
        paths = inference.main(gen(stage, tmp_path / f"gen-{stage.name}"))
        images[stage] = np.asarray(Image.open(paths[0]))
    assert not np.array_equal(images[s3], images[no_te])
    # stock diffusers (the model card's recipe): the encoders as pipeline components, the embeddings, the LoRA
    comps = {} if family == "sdxl" else {"safety_checker": None}
    for name in ENCODERS[family]:
        cls = getattr(transformers, json.loads((s3 / name / "config.json").read_text())["architectures"][0])
        comps[name] = cls.from_pretrained(s3 / name)
    pipe = _with_stage(DiffusionPipeline.from_pretrained(model, **comps), family, s3)
    img = pipe(
        [PROMPT], generator=[torch.Generator("cpu").manual_seed(0)], num_inference_steps=3, height=64, width=64
    ).images[0]
    assert np.array_equal(images[s3], np.asarray(img))
    # a LoRA file cannot carry a whole encoder: the kohya export and a text LoRA on top are refused, nothing written
    for flag in ("--export_kohya", "--train_text_encoder_lora"):
        out = tmp_path / f"refused{flag}"
        code, err = run_cli(train_lora.main, lora_args(model, concept_set, s2, out, flag), capsys)
        assert code == 2 and "whole fine-tuned text encoder" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def _without_encoders(stage, out, family, replace=False):
    """A copy of a stage dir without its whole encoders (folders and manifest entry)."""
    if replace:
        shutil.rmtree(out)
    shutil.copytree(stage, out)
    for name in ENCODERS[family]:
        shutil.rmtree(out / name)
    manifest = json.loads((out / "clif_manifest.json").read_text())
    del manifest["files"]["text_encoder"]
    (out / "clif_manifest.json").write_text(json.dumps(manifest))


def _with_stage(pipe, family, stage):
    for f in sorted((stage / "embeddings").glob("*.safetensors")):
        load_embedding(pipe, family, f"<{f.stem}>", load_file(str(f)))
    pipe.load_lora_weights(str(stage))
    return pipe


def test_full_text_encoder_resume_is_bit_identical(tiny_sd15, concept_set, segmenter_dir, tmp_path):  # noqa: F811
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    full, part = tmp_path / "full", tmp_path / "part"
    full_stage1(tiny_sd15, concept_set, full, segmenter_dir, tmp_path / "c", *extra)
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    full_stage1(
        tiny_sd15, concept_set, part, segmenter_dir, tmp_path / "c", *extra, "--resume_from_checkpoint", "latest"
    )
    a, b = weights(full / "text_encoder"), weights(part / "text_encoder")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mid = weights(full / "checkpoint-2" / "text_encoder")
    assert not all(torch.equal(a[k], mid[k]) for k in a)  # steps 3-4 moved it: the comparison is not vacuous
    for n in ("redball", "bluebox"):
        x = load_file(str(full / "embeddings" / f"{n}.safetensors"))
        y = load_file(str(part / "embeddings" / f"{n}.safetensors"))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_whole_encoder_files_in_either_key_layout(tiny_sd15, tmp_path):
    """save_pretrained may write CLIP text keys under `text_model.` while the module names them without it (or
    the other way round): both load; a file of another architecture is one UserError line."""
    from safetensors.torch import save_file

    from clif import full_text
    from clif.errors import UserError
    from clif.models import load_model

    model = load_model(str(tiny_sd15), text_only=True)
    enc = model.text_encoders[0]
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.5)
    (tmp_path / "s").mkdir()
    full_text.save(tmp_path / "s", model)
    saved = weights(tmp_path / "s" / "text_encoder")
    for layout in ("prefixed", "bare"):
        keys = {
            (k if k.startswith("text_model.") else f"text_model.{k}")
            if layout == "prefixed"
            else k.removeprefix("text_model."): v
            for k, v in saved.items()
        }
        save_file(keys, str(tmp_path / "s" / "text_encoder" / "model.safetensors"))
        fresh = load_model(str(tiny_sd15), text_only=True)
        assert full_text.load(tmp_path / "s", fresh)
        a, b = enc.state_dict(), fresh.text_encoders[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    save_file({k: v for k, v in list(saved.items())[1:]}, str(tmp_path / "s" / "text_encoder" / "model.safetensors"))
    with pytest.raises(UserError, match="not a text encoder of this base model"):
        full_text.load(tmp_path / "s", load_model(str(tiny_sd15), text_only=True))
