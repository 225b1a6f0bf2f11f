"""Stage 3: LoRA + embeddings, stock-diffusers equality, kohya export, resume, loss, full-size architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, built_once, load_embedding, lora_args, needs_data, run_cli, stock_pipeline, ti_args
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import inference
import train_lora
import train_ti


@pytest.fixture(scope="module")
def ti_runs(tiny_models, concept_set, tmp_path_factory):
    def build(root):
        for family, model in tiny_models.items():
            train_ti.main(ti_args(model, concept_set, root / family, "--max_train_steps", "2"))

    root = built_once(tmp_path_factory, "lora-ti-runs", build)
    return {family: root / family for family in tiny_models}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_chain_stock_and_kohya(family, tiny_models, concept_set, ti_runs, tmp_path):
    model, out = tiny_models[family], tmp_path / "lora"
    extra = ["--export_kohya", "--cache_latents", "--train_text_encoder_lora"]
    train_lora.main(lora_args(model, concept_set, ti_runs[family], out, *extra))
    manifest = json.loads((out / "clif_manifest.json").read_text())
    assert manifest["stage"] == "lora" and manifest["inputs"] == [str(ti_runs[family].resolve())]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2  # rank/alpha round-trip (flattened keys)
    # the embeddings kept training (lr 1e-2): stage-3 rows differ from stage-2 rows
    a = load_file(str(ti_runs[family] / "embeddings" / "redball.safetensors"))
    b = load_file(str(out / "embeddings" / "redball.safetensors"))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)

    prompt = "a <redball> next to a <bluebox>"
    paths = inference.main(["--pretrained_model_name_or_path", str(model), "--stage_dir", str(out), "--prompt", prompt, "--regions", "none",
                            "--num_images_per_prompt", "2", "--batch_size", "2", "--num_inference_steps", "3",
                            "--output_dir", str(tmp_path / "gen")])
    ours = [np.asarray(Image.open(p)) for p in paths]
    call = {"num_inference_steps": 3, "height": 64, "width": 64}

    pipe = stock_pipeline(model, family, out)  # the README snippet: embeddings + load_lora_weights(dir)
    stock = pipe([prompt] * 2, generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)], **call).images
    for x, y in zip(ours, stock):
        assert np.array_equal(x, np.asarray(y)), np.abs(x.astype(int) - np.asarray(y).astype(int)).max()

    # kohya export: real alpha, bundled embeddings; diffusers needs the bundle_emb keys split off.
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    te = ["lora_te1_text_model_", "lora_te2_text_model_"] if family == "sdxl" else ["lora_te_text_model_"]
    assert all(any(k.startswith(p) for k in kohya) for p in te)
    bundle = {k: v for k, v in kohya.items() if k.startswith("bundle_emb.")}
    pipe = stock_pipeline(model, family)
    per_token: dict[str, dict] = {}
    for k, v in bundle.items():
        name, key = k.split(".", 2)[1:]
        per_token.setdefault(f"<{name}>", {})[key] = v
    for token, state in per_token.items():
        load_embedding(pipe, family, token, state)
    pipe.load_lora_weights({k: v for k, v in kohya.items() if k not in bundle})
    from_kohya = pipe([prompt] * 2, generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)], **call).images
    for x, y in zip(ours, from_kohya):
        assert np.abs(x.astype(int) - np.asarray(y).astype(int)).max() <= 2
    # A different LoRA scale changes the image (the LoRA is really applied).
    half = inference.main(["--pretrained_model_name_or_path", str(model), "--stage_dir", str(out), "--prompt", prompt, "--regions", "none",
                           "--num_images_per_prompt", "1", "--num_inference_steps", "3", "--lora_scale", "0",
                           "--output_dir", str(tmp_path / "gen0")])
    assert not np.array_equal(np.asarray(Image.open(half[0])), ours[0])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.heavy(15)
def test_sidecar_alone_remakes_its_image(family, tiny_models, concept_set, ti_runs, tmp_path):
    """Image 2 of 4, generated in batches of 1 and of 4 (SD 1.5 with embeddings, SDXL with LoRA), re-made bitwise
    from its sidecar alone: by clif.generate.remake and by the README's stock-diffusers recipe."""
    import diffusers

    from clif.generate import remake

    model, stage = tiny_models[family], ti_runs[family]
    if family == "sdxl":
        stage = tmp_path / "lora"
        train_lora.main(lora_args(model, concept_set, ti_runs[family], stage, "--max_train_steps", "1"))
    for bs in (1, 4):
        paths = inference.main(["--pretrained_model_name_or_path", str(model), "--stage_dir", str(stage), "--prompt",
                                "a <redball> next to a <bluebox>", "--regions", "none", "--num_images_per_prompt", "4", "--batch_size",
                                str(bs), "--seed", "5", "--num_inference_steps", "2", "--output_dir",
                                str(tmp_path / f"gen{bs}")])
        sidecar = paths[2].with_suffix(".json")
        s = json.loads(sidecar.read_text())
        batch = (1, [7], 0) if bs == 1 else (4, [5, 6, 7, 8], 2)  # image 2 has seed 5 + 2
        assert (s["batch_size"], s["batch_seeds"], s["batch_index"]) == batch
        assert (s["stage_dir"], s["lora_scale"]) == (str(stage), 1.0 if family == "sdxl" else None)
        want = np.asarray(Image.open(paths[2]))
        assert np.array_equal(np.asarray(remake(sidecar)), want)

        pipe = stock_pipeline(s["base_model"], s["family"], Path(s["stage_dir"]))  # the README recipe
        pipe.scheduler = getattr(diffusers, s["scheduler"]).from_config(s["scheduler_config"])
        extra = {"cross_attention_kwargs": {"scale": s["lora_scale"]}} if s["lora_scale"] is not None else {}
        images = pipe([s["prompt"]] * s["batch_size"],
                      generator=[torch.Generator("cpu").manual_seed(x) for x in s["batch_seeds"]],
                      num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                      height=s["height"], width=s["width"], **extra).images
        assert np.array_equal(np.asarray(images[s["batch_index"]]), want)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_exported_lora_tensor_trained(family, tiny_models, concept_set, ti_runs, tmp_path):
    """No dead tensors: every LoRA up-weight starts at zero, so one still zero after training received no gradient
    (SDXL once put a LoRA on text encoder 1's last layer, whose output generation never reads)."""
    out = tmp_path / "lora"
    train_lora.main(lora_args(tiny_models[family], concept_set, ti_runs[family], out, "--train_text_encoder_lora",
                              "--max_train_steps", "2"))
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    up = {k: v for k, v in state.items() if "lora_B" in k or ".up." in k}
    assert any(k.startswith("text_encoder.") for k in up) and any(k.startswith("unet.") for k in up)
    dead = [k for k, v in up.items() if not v.abs().sum() > 0]
    assert not dead, f"{len(dead)} of {len(up)} LoRA tensors never trained, e.g. {dead[:4]}"


def test_lora_resume_is_bit_identical(tiny_sd15, concept_set, ti_runs, tmp_path):
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
             "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--random_flip", "--snr_gamma", "5",
             "--lora_dropout", "0.1"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_runs["sd15"], full, *extra))
    part.mkdir()
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_runs["sd15"], part, *extra, "--resume_from_checkpoint",
                              "latest"))
    for f in ("pytorch_lora_weights.safetensors", "embeddings/redball.safetensors", "embeddings/bluebox.safetensors"):
        a, b = load_file(str(full / f)), load_file(str(part / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    c2 = load_file(str(full / "checkpoint-2" / "trainables.safetensors"))
    c4 = load_file(str(full / "checkpoint-4" / "trainables.safetensors"))
    assert any(k.startswith("embedding.") for k in c4) and any(k.startswith("unet.") for k in c4)
    assert not all(torch.equal(c2[k], c4[k]) for k in c2)


def test_frozen_embeddings_and_prior_preservation(tiny_sd15, concept_set, ti_runs, tmp_path):
    out = tmp_path / "lora"
    class_dir = tmp_path / "class"
    train_lora.main(lora_args(tiny_sd15, concept_set, ti_runs["sd15"], out, "--embedding_learning_rate", "0",
                              "--with_prior_preservation", "--class_prompt", "a photo of a ball", "--class_data_dir",
                              str(class_dir), "--num_class_images", "3", "--max_train_steps", "2"))
    assert len(list(class_dir.glob("*.png"))) == 3  # generated once, cached
    for n in ("redball", "bluebox"):
        a = load_file(str(ti_runs["sd15"] / "embeddings" / f"{n}.safetensors"))
        b = load_file(str(out / "embeddings" / f"{n}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0 freezes the rows exactly


@needs_data("dreambench-mini")
def test_loss_falls_when_overfitting_two_concepts(tiny_sd15, tmp_path):
    root = tmp_path / "db"
    root.mkdir()
    spec = [{"name": n, "token": f"<{n}>", "initializer": c, "images": str(SHARED_DATA / "dreambench-mini" / n)}
            for n, c in (("dog2", "dog"), ("teapot", "teapot"))]
    (root / "concepts.json").write_text(json.dumps({"concepts": spec}))
    ti = tmp_path / "ti"
    train_ti.main(ti_args(tiny_sd15, root, ti, "--max_train_steps", "1", "--allow_word_names"))  # 'teapot' is a word
    out = tmp_path / "lora"
    train_lora.main(lora_args(tiny_sd15, root, ti, out, "--max_train_steps", "40", "--learning_rate", "1e-2",
                              "--rank", "8", "--lora_alpha", "8", "--cache_latents", "--train_batch_size", "4",
                              "--allow_word_names"))
    losses = json.loads((out / "run_stats.json").read_text())["losses"]
    assert len(losses) == 40
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.9 * first, (first, last)


def test_lora_bad_inputs(tiny_models, concept_set, ti_runs, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (lora_args(tiny_models["sd15"], concept_set, ti_runs["sd15"], out, "--rank", "0"), "must be > 0"),
        (lora_args(tiny_models["sd15"], concept_set, ti_runs["sd15"], out, "--lora_targets", "to_q,to_nothing"),
         "to_nothing"),
        (lora_args(tiny_models["sd15"], concept_set, ti_runs["sd15"], out, "--with_prior_preservation"),
         "--class_prompt"),
        (lora_args(tiny_models["sd15"], concept_set, ti_runs["sdxl"], out), "family 'sdxl'"),
        (lora_args(tiny_models["sd15"], concept_set, tmp_path / "missing", out), "does not exist"),
    ]
    for argv, needle in cases:
        code, err = run_cli(train_lora.main, argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
        assert not out.exists()


@pytest.mark.slow
@pytest.mark.heavy(45)
def test_full_sd15_architecture_one_step(tmp_path, concept_set):
    """The real SD1.5 architecture (random weights, no download): stage 2 then one stage-3 step, latents cached, at
    128 px (16x16 latents: every level of the UNet still runs; the VAE encodes dominate the cost at 256 px). Stored in
    fp16, as many checkpoints are (half the bytes to write and read); it trains in fp32 all the same (test_tiny)."""
    from bench.benchmark import build_full_sd15
    from clif.fixtures.synthetic import write_concept_set

    model = build_full_sd15(tmp_path / "sd15", dtype=torch.float16)
    data = write_concept_set(tmp_path / "data", n_concepts=2, n_images=2, size=128)
    common = ["--resolution", "128", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
              "--max_train_steps", "1", "--report_to", "none", "--cache_latents"]
    base = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]
    train_ti.main([*base, "--output_dir", str(tmp_path / "ti"), *common])
    train_lora.main([*base, "--stage_dir", str(tmp_path / "ti"), "--output_dir", str(tmp_path / "lora"), *common])
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 4 * 32  # up/down x q,k,v,out x 32 attention blocks of SD1.5 (16 transformers x 2 attn)
    rows = load_file(str(tmp_path / "lora" / "embeddings" / "redball.safetensors"))["<redball>"]
    assert rows.shape == (2, 768) and torch.isfinite(rows).all()


def test_text_cache_equals_encoding(tiny_sdxl):
    """The frozen-text cache of stage 3 (embedding lr 0) returns exactly what the encoders compute."""
    from clif.models import load_model
    from clif.train.training import TextCache

    model = load_model(str(tiny_sdxl))
    caps = ["a photo of a ball", "a photo of a box", "a photo of a ball"]
    hidden, pooled = model.encode_prompt(model.tokenize(caps))
    ch, cp = TextCache(model)(caps)
    # per-caption encoding vs one batched call: equal up to the rounding of a batched matmul
    torch.testing.assert_close(ch, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cp, pooled, rtol=0, atol=1e-6)
