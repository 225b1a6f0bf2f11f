"""The offline tiny models: faithful, deterministic, with the real CLIP tokenizer and paired CLIP towers."""

from __future__ import annotations

import gzip

import torch
from safetensors.torch import load_file


def test_same_command_same_weights(tmp_path, tiny_sd15):
    from clif.fixtures.tiny import build

    again = build("sd15", tmp_path / "again")
    for sub in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "paired_clip/model.safetensors"):
        a, b = load_file(str(tiny_sd15 / sub)), load_file(str(again / sub))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    other = build("sd15", tmp_path / "other", seed=1)
    a = load_file(str(tiny_sd15 / "text_encoder/model.safetensors"))
    b = load_file(str(other / "text_encoder/model.safetensors"))
    assert not torch.equal(a["embeddings.token_embedding.weight"], b["embeddings.token_embedding.weight"])


def test_real_clip_tokenizer(tiny_sd15):
    from transformers import CLIPTokenizer

    from clif.fixtures.tiny import _bpe_path

    tok = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    # ids of the public CLIP vocabulary: 'a'=320, 'photo'=1125, 'of'=539, 'dog'=1929
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    with gzip.open(_bpe_path()) as f:
        merges = f.read().decode().split("\n")
    assert tok.convert_tokens_to_ids("".join(merges[1].split())) == 512  # first merge follows the 512 byte symbols


def test_sdxl_architecture_and_paired_clip(tiny_sdxl):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    enc2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    clip2 = CLIPModel.from_pretrained(tiny_sdxl / "paired_clip_2")
    for k, v in enc2.text_model.state_dict().items():
        assert torch.equal(v, clip2.text_model.state_dict()[k]), k
    assert torch.equal(enc2.text_projection.weight, clip2.text_projection.weight)
    assert (tiny_sdxl / "paired_clip" / "model.safetensors").exists()


def test_a_model_stored_in_half_precision_loads_for_training_in_fp32(tiny_sdxl, tmp_path):
    """Many checkpoints are stored in fp16: load_model gives fp32 modules all the same (transformers alone would keep
    the text encoders in fp16), holding the stored values."""
    from diffusers import StableDiffusionXLPipeline

    from clif.models import load_model

    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).to(torch.float16).save_pretrained(tmp_path / "half")
    model = load_model(str(tmp_path / "half"))
    modules = {"unet": model.unet, "vae": model.vae, "te1": model.text_encoders[0], "te2": model.text_encoders[1]}
    assert {n: {p.dtype for p in m.parameters()} for n, m in modules.items()} == {n: {torch.float32} for n in modules}
    half = load_file(str(tmp_path / "half" / "text_encoder_2" / "model.safetensors"))
    k = next(k for k in half if k.endswith("q_proj.weight"))
    assert torch.equal(dict(model.text_encoders[1].named_parameters())[k], half[k].float())
