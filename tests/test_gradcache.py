"""Gradient-cached stage 1: chunked text-encoder passes give the gradient and the run of one whole-batch pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

import train_clif
from clif.contrastive.gradcache import cached_backward
from clif.contrastive.losses import clip_loss
from clif.contrastive.paired import PairedCLIP, default_pair
from clif.contrastive.text_side import TextSide
from clif.tokens import expand_prompt
from clif.train.stage import install_embeddings, prepare


def clif_args(model, data, out, cache, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--cache_dir", str(cache), "--report_to", "none", "--num_pairs", "48", "--train_batch_size", "10",
            "--max_train_steps", "2", "--learning_rate", "1e-1", "--mixed_precision", "no", *extra]


def _grads(text, params, captions, keys, image, scales, chunk):
    for p in params:
        p.grad = None

    def loss_of(feats):
        return sum(clip_loss(f, i, keys, s) for f, i, s in zip(feats, image, scales))

    loss = cached_backward(lambda s: text.features(captions[s]), len(captions), chunk, loss_of, torch.Tensor.backward)
    return loss, [p.grad.clone() for p in params]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_chunked_gradient_equals_whole_batch(family, tiny_models, concept_set, tmp_path):
    model_dir = tiny_models[family]
    args = train_clif.build_parser().parse_args(clif_args(model_dir, concept_set, tmp_path / "o", tmp_path / "c"))
    inp = prepare(args, text_only=True)
    params = [m.new for m in install_embeddings(inp)]
    paired = [PairedCLIP(default_pair(str(model_dir), i, e.config.hidden_size), e, "cpu", torch.float32)
              for i, e in enumerate(inp.model.text_encoders)]
    text = TextSide(inp.model, paired, inp.concepts)
    toks = [c.token for c in inp.concepts]
    captions = [f"a photo of {toks[i % 2]}" if i % 3 else f"a rendering of {toks[i % 2]} and a dog" for i in range(11)]
    keys = [c.replace("rendering", "photo") for c in captions]
    gen = torch.Generator().manual_seed(0)
    image = [torch.randn(len(captions), p.model.text_projection.out_features, generator=gen) for p in paired]
    scales = [p.logit_scale for p in paired]
    loss, whole = _grads(text, params, captions, keys, image, scales, None)
    for chunk in (1, 4, 10):
        loss_c, chunked = _grads(text, params, captions, keys, image, scales, chunk)
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
        for a, b in zip(chunked, whole):
            scale = float(b.abs().max())
            assert scale > 0  # float32 sums in another order: tolerance relative to the gradient's scale
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_text_features_skip_only_positions_after_the_last_eos(tiny_sdxl, concept_set, tmp_path):
    args = train_clif.build_parser().parse_args(clif_args(tiny_sdxl, concept_set, tmp_path / "o", tmp_path / "c"))
    inp = prepare(args, text_only=True)
    install_embeddings(inp)
    paired = [PairedCLIP(default_pair(str(tiny_sdxl), i, e.config.hidden_size), e, "cpu", torch.float32)
              for i, e in enumerate(inp.model.text_encoders)]
    text = TextSide(inp.model, paired, inp.concepts)
    captions = ["a photo of <redball>", "a rendering of <bluebox> on the left and a dog on the right"]
    with torch.no_grad():
        short = text.features(captions)
        ids = inp.model.tokenize([expand_prompt(c, inp.concepts) for c in captions])
        full = [p.text_features(e, i, t.eos_token_id)  # all 77 positions
                for p, e, i, t in zip(paired, inp.model.text_encoders, ids, inp.model.tokenizers)]
    for a, b in zip(short, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_run_equals_whole_batch_run(tiny_sdxl, concept_set, tmp_path):
    """Two steps of stage 1 on SDXL (both encoders): --text_chunk_size 3 = one pass over the batch of 10."""
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    train_clif.main(clif_args(tiny_sdxl, concept_set, whole, tmp_path / "c"))
    train_clif.main(clif_args(tiny_sdxl, concept_set, chunked, tmp_path / "c", "--text_chunk_size", "3"))
    l1 = json.loads((whole / "run_stats.json").read_text())["losses"]
    l2 = json.loads((chunked / "run_stats.json").read_text())["losses"]
    assert len(l1) == 2 and l1[1] != l1[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    for name in ("redball", "bluebox"):
        a = load_file(str(whole / "embeddings" / f"{name}.safetensors"))
        b = load_file(str(chunked / "embeddings" / f"{name}.safetensors"))
        assert a.keys() == b.keys() == {"clip_l", "clip_g"}
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_chunk_size_must_be_positive(tiny_sd15, concept_set, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = run_cli(train_clif.main, clif_args(tiny_sd15, concept_set, out, tmp_path / "c",
                                                   "--text_chunk_size", "0"), capsys)
    assert code == 2 and "--text_chunk_size" in err and "must be > 0" in err and not out.exists()
