"""LoRA files that other tools load: kohya/A1111/ComfyUI key names and header, diffusers files as in the wild."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import stock_pipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clif import lora
from clif.concepts import Concept
from clif.models import load_model

# The attention projections of a CLIP text layer, as ComfyUI's LORA_CLIP_MAP and kohya's CLIPAttention targets name them
CLIP_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def expected_kohya_modules(model_dir, family: str) -> set[str]:
    """The module names the tools map, derived from the pipeline's own module paths and configs.

    UNet: `lora_unet_` + the diffusers module path with `.` -> `_` (kohya's create_modules; ComfyUI's
    model_lora_keys_unet on diffusers keys). Text encoders: the transformers-4 layout `text_model.encoder.layers.N.…`
    under `lora_te` (SD 1.x/2.x) or `lora_te1`/`lora_te2` (SDXL), as ComfyUI's model_lora_keys_clip spells them.
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    names = {
        "lora_unet_" + n.replace(".", "_")
        for n, _ in unet.named_modules()
        if any(n.endswith(f".{t}") for t in UNET_ATTN) and (".attn1." in n or ".attn2." in n)
    }
    subfolders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    prefixes = ["lora_te"] if family != "sdxl" else ["lora_te1", "lora_te2"]
    for prefix, sub in zip(prefixes, subfolders):
        layers = json.loads((model_dir / sub / "config.json").read_text())["num_hidden_layers"]
        names |= {
            f"{prefix}_text_model_encoder_layers_{b}_{c.replace('.', '_')}" for b in range(layers) for c in CLIP_ATTN
        }
    return names


def _model_with_random_lora(model_dir, seed: int = 0):
    """A tiny model with LoRA on the UNet and every text encoder, the up-weights non-zero (so the LoRA shows)."""
    model = load_model(str(model_dir))
    lora.add_lora(model.unet, rank=2, alpha=1.0, dropout=0.0, targets=lora.DEFAULT_UNET_TARGETS, seed=0)
    for enc in model.text_encoders:
        lora.add_lora(enc, rank=2, alpha=1.0, dropout=0.0, targets=lora.TEXT_TARGETS, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (model.unet, *model.text_encoders):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _image(pipe):
    out = pipe(["a photo"], generator=[torch.Generator("cpu").manual_seed(0)], num_inference_steps=2, height=64,
               width=64, output_type="np")
    return out.images[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_export_names_and_metadata(family, tiny_models, tmp_path):
    model_dir = tiny_models[family]
    model = _model_with_random_lora(model_dir)
    c = Concept(name="ball", token="<ball>", initializer="ball", class_word="ball", images=[], num_vectors=2)
    rows = [[torch.zeros(2, enc.config.hidden_size) for enc in model.text_encoders]]
    path = tmp_path / "x_kohya.safetensors"
    lora.export_kohya(path, model, 1.0, True, [c], rows)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = expected_kohya_modules(model_dir, family)
    expected = {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    bundle = {k for k in keys if k.startswith("bundle_emb.")}
    assert keys - bundle == expected
    assert bundle == ({"bundle_emb.ball.clip_l", "bundle_emb.ball.clip_g"} if family == "sdxl"
                      else {"bundle_emb.ball.string_to_param.*"})
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 1.0
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
    assert meta["ss_v2"] == "False"


def test_kohya_version_of_sd2_v_prediction(tmp_path):
    """SD 2.x (text width 1024) with v-prediction is `sd_v2_v`, ss_v2 True (kohya's version string)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from clif.models import DiffusionModel

    enc = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=10, max_position_embeddings=8))
    sched = type("S", (), {"config": type("C", (), {"prediction_type": "v_prediction"})()})()
    model = DiffusionModel("sd", "x", [None], [enc], None, None, sched)
    assert model.kohya_metadata() == {"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}
    assert model.kohya_text_prefixes == ["lora_te"] and model.text_encoder_names == ["text_encoder"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_lora_file_keys_as_in_the_wild_both_directions(family, tiny_models, tmp_path):
    """Our pytorch_lora_weights names text-encoder layers `text_encoder[_2].text_model.encoder.layers.N…`; stock
    diffusers loads it, and loads the same weights named without `text_model.` (transformers-5 peft names) to the
    same image; our stage loader reads both back to the same LoRA weights."""
    model_dir = tiny_models[family]
    model = _model_with_random_lora(model_dir)
    ours = tmp_path / "ours"
    ours.mkdir()
    lora.save_lora(ours, model, text_lora=True)
    state = load_file(str(ours / lora.LORA_FILE))
    text_keys = [k for k in state if k.startswith("text_encoder")]
    names = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assert {k.split(".")[0] for k in text_keys} == set(names)
    assert all(k.split(".", 1)[1].startswith("text_model.encoder.layers.") for k in text_keys), text_keys[:3]

    other = tmp_path / "other"
    other.mkdir()
    with safe_open(str(ours / lora.LORA_FILE), framework="pt") as f:
        meta = f.metadata()
    save_file({k.replace(".text_model.", ".", 1): v for k, v in state.items()}, str(other / lora.LORA_FILE), meta)

    base = _image(stock_pipeline(model_dir, family))
    a = _image(stock_pipeline(model_dir, family, ours))
    b = _image(stock_pipeline(model_dir, family, other))
    assert np.array_equal(a, b) and not np.array_equal(a, base)

    # each text encoder's layers alone change the image: they were loaded, not skipped
    for name in names:
        one = tmp_path / name
        one.mkdir()
        save_file({k: state[k] for k in text_keys if k.split(".")[0] == name}, str(one / lora.LORA_FILE), meta)
        assert not np.array_equal(_image(stock_pipeline(model_dir, family, one)), base), name

    for d in (ours, other):
        fresh = load_model(str(model_dir), text_only=True)
        assert lora.load_text_lora(d, fresh)
        for enc, ref in zip(fresh.text_encoders, model.text_encoders):
            got, want = lora.text_state_dict(enc), lora.text_state_dict(ref)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in got)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_export_loads_in_stock_diffusers(family, tiny_models, tmp_path):
    """The kohya export (text encoders included) gives stock diffusers the image of our diffusers file."""
    model_dir = tiny_models[family]
    model = _model_with_random_lora(model_dir)
    d = tmp_path / "ours"
    d.mkdir()
    lora.save_lora(d, model, text_lora=True)
    rows = [[torch.zeros(2, enc.config.hidden_size) for enc in model.text_encoders]]
    c = Concept(name="ball", token="<ball>", initializer="ball", class_word="ball", images=[], num_vectors=2)
    lora.export_kohya(tmp_path / "k.safetensors", model, 1.0, True, [c], rows)
    kohya = {k: v for k, v in load_file(str(tmp_path / "k.safetensors")).items() if not k.startswith("bundle_emb.")}
    pipe = stock_pipeline(model_dir, family)
    pipe.load_lora_weights(kohya)
    assert np.abs(_image(pipe) - _image(stock_pipeline(model_dir, family, d))).max() < 1e-4
