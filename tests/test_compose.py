"""Prompts with two or more concepts (clif/compose): regions from layout words and reading order, region masks at
every attention resolution (SD1.5 and SDXL), the regional processor, isolated encoding and its splice, the leak
probe on spliced states, and stock-diffusers reproduction from saved embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import built_once, lora_args, stock_pipeline, ti_args
from PIL import Image
from safetensors.torch import load_file

import inference
import train_lora
import train_ti
from clif.compose import isolate
from clif.compose import prompt as words
from clif.compose.attention import ComposeProcessor, ComposeState
from clif.compose.regions import box_mask, grid_of, mask_weights, masks_from_maps, region_weights

A, B = "<redball>", "<bluebox>"
TWO = f"a photo of a {A} on the left and a {B} on the right"
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


# ---- prompts: which concepts, where (known answers)


@pytest.mark.parametrize(
    "prompt, boxes, source",
    [
        (f"{A} hugging {B} in front of the Eiffel tower", {A: LEFT, B: RIGHT}, "reading order"),
        (f"{B} hugging {A}", {B: LEFT, A: RIGHT}, "reading order"),
        (f"a {A} on the right and a {B} on the left", {A: RIGHT, B: LEFT}, "layout words"),
        (f"a {A} to the right of a {B}", {A: RIGHT, B: LEFT}, "layout words"),
        (f"a {A} above a {B}", {A: (0.0, 0.0, 1.0, 0.5), B: (0.0, 0.5, 1.0, 1.0)}, "layout words"),
        (f"a {B} under a {A}", {B: (0.0, 0.5, 1.0, 1.0), A: (0.0, 0.0, 1.0, 0.5)}, "layout words"),
        (f"a {A} on the right next to a {B}", {A: RIGHT, B: LEFT}, "layout words"),  # one placed: the other opposite
    ],
)
def test_auto_boxes(prompt, boxes, source):
    got, how = words.auto_boxes(prompt, [A, B])
    assert got == boxes and how == source


def test_reading_order_of_three_and_conflicting_layout_words():
    c = "<c>"
    got, how = words.auto_boxes(f"{c} and {A} with {B}", [A, B, c])
    assert list(got) == [c, A, B] and how == "reading order"
    assert [round(b[0], 3) for b in got.values()] == [0.0, 0.333, 0.667]
    got, how = words.auto_boxes(f"{A} on the left and {B} on the left", [A, B])
    assert got == {A: LEFT, B: RIGHT} and how.startswith("reading order (")


def test_named_concepts_whole_tokens_only():
    assert words.named_concepts(f"{B} and {A} and {B}", [A, B]) == [B, A]
    assert words.named_concepts("a <redball_2> and <redballs>", [A]) == []


@pytest.mark.parametrize(
    "how, want",
    [
        ("same", f"a photo of a {B} on the left and a {B} on the right"),
        ("class", f"a photo of a ball on the left and a {B} on the right"),
        ("alone", f"a photo of a {B}"),
    ],
)
def test_region_prompts(how, want):
    assert words.region_prompt(TWO, B, [A, B], how, {A: "ball", B: "box"}) == want


# ---- region masks


def test_box_masks_and_weights():
    m = box_mask(LEFT, 2, 4)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert box_mask((0.4, 0.4, 0.45, 0.45), 2, 2).sum() == 1  # a box smaller than a cell keeps its centre cell
    w = region_weights([(0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 1.0)], 1, 4, "mean")
    assert w.tolist() == [[1, 0.5, 0.5, 0], [0, 0.5, 0.5, 1], [0, 0, 0, 0]]
    w = region_weights([(0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 1.0)], 1, 4, "global")
    assert w.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]]
    w = region_weights([(0.0, 0.0, 0.25, 1.0)], 1, 4)
    assert w.tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]  # outside every box: the global prompt
    assert grid_of(16, (8, 8)) == (4, 4) and grid_of(2 * 3, (7, 11)) == (2, 3)
    with pytest.raises(ValueError):
        grid_of(5, (8, 8))


def test_regions_from_attention_maps():
    maps = torch.zeros(1, 2, 2, 4)
    maps[0, 0, :, :2], maps[0, 1, :, 2:] = 1.0, 4.0  # each concept attended on its own half (different scales)
    maps[0, 0, 0, 3] = 0.5  # weak <a> attention on <b>'s side does not win
    maps[0, :, 1, 1] = 0.1  # both weak here: the global prompt
    m = masks_from_maps(maps)
    assert m[0, 0].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]] and m[0, 1].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    w = mask_weights(m, 1, 2)  # area-averaged onto a coarser grid, then shared as boxes are
    assert w.shape == (1, 3, 2) and torch.allclose(w.sum(1), torch.ones(1, 2))
    assert torch.allclose(w[0, :, 0], torch.tensor([0.75, 0.0, 0.25]))


@pytest.fixture(scope="module")
def pipes(tiny_models):
    from diffusers import DiffusionPipeline

    return {
        f: DiffusionPipeline.from_pretrained(m, **({} if f == "sdxl" else {"safety_checker": None}))
        for f, m in tiny_models.items()
    }


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_region_masks_at_every_attention_resolution(family, pipes):
    """Every cross-attention layer of the UNet, at its own resolution: on the conditional rows, the cells of the
    left box read the left region's states, those of the right box the right region's; unconditional rows and
    (strength 0) everything stay the UNet's own processor's output."""
    unet = pipes[family].unet
    sizes = {}

    def seen(name):
        def hook(mod, args, kwargs):
            sizes[name] = args[0].shape[1]

        return hook

    hooks = [
        m.register_forward_pre_hook(seen(n), with_kwargs=True) for n, m in unet.named_modules() if n.endswith("attn2")
    ]
    latent = (8, 8)
    x = torch.randn(1, 4, *latent)
    d = unet.config.cross_attention_dim
    extra = {}
    if family == "sdxl":  # the pooled width: what the added-condition projection takes beside 6 time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled), "time_ids": torch.zeros(1, 6)}}
    with torch.no_grad():
        unet(x, 1, encoder_hidden_states=torch.randn(1, 77, d), **extra)
    for h in hooks:
        h.remove()
    grids = {grid_of(n, latent) for n in sizes.values()}
    assert len(grids) >= 2 if family == "sd15" else len(grids) >= 1, grids  # sd15 tiny: 8x8 and the 4x4 mid block
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(2, 77, d, generator=g)
    for name, n in sizes.items():
        attn = unet.get_submodule(name)
        base = attn.processor.base if isinstance(attn.processor, ComposeProcessor) else attn.processor
        hs = torch.randn(2, n, attn.to_q.in_features, generator=g)  # [uncond, cond]
        ehs = torch.randn(2, 77, d, generator=g)
        st = ComposeState(latent_hw=latent, n_images=1, boxes=[LEFT, RIGHT], region_states=regions, window=(0, 1))
        with torch.no_grad():
            out = ComposeProcessor(base, st)(attn, hs, ehs)
            plain = base(attn, hs, ehs)
            left = base(attn, hs[1:], regions[:1])[0]
            right = base(attn, hs[1:], regions[1:])[0]
        h, w = grid_of(n, latent)
        col = torch.arange(n) % w
        torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
        torch.testing.assert_close(out[1][col < w // 2], left[col < w // 2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[1][col >= w // 2], right[col >= w // 2], rtol=1e-5, atol=1e-6)
        st.strength = 0.0
        with torch.no_grad():
            torch.testing.assert_close(ComposeProcessor(base, st)(attn, hs, ehs), plain, rtol=0, atol=0)
        st.strength, st.step = 1.0, 1  # outside the step window: the plain output
        with torch.no_grad():
            torch.testing.assert_close(ComposeProcessor(base, st)(attn, hs, ehs), plain, rtol=0, atol=0)
        # the bias variant: the global states, tokens 2-3 hidden on the right, 6-7 on the left; the recorded maps
        # show no attention to a hidden token inside its region
        st = ComposeState(
            latent_hw=latent,
            n_images=1,
            boxes=[LEFT, RIGHT],
            mode="bias",
            hidden=[[6, 7], [2, 3]],
            window=(0, 1),
            record=[([2, 3], []), ([6, 7], [])],
        )
        with torch.no_grad():
            biased = ComposeProcessor(base, st)(attn, hs, ehs)
        assert torch.equal(biased[0], plain[0]) and not torch.equal(biased[1], plain[1])
        m = st.maps[0]  # [concepts, 8, 8], bilinear from this layer's grid
        assert (m[0, :, -1] == 0).all() and (m[0, :, 0] > 0).all()
        assert (m[1, :, 0] == 0).all() and (m[1, :, -1] > 0).all()


# ---- isolated encoding


@pytest.fixture(scope="module")
def chains(tiny_models, concept_set, tmp_path_factory):
    """Stage 3 (LoRA) on stage 2, both families: what inference and the probe load (built once for all workers)."""

    def build(root):
        for family, model in tiny_models.items():
            train_ti.main(ti_args(model, concept_set, root / family / "ti", "--max_train_steps", "2"))
            train_lora.main(lora_args(model, concept_set, root / family / "ti", root / family / "lora",
                                      "--max_train_steps", "2"))  # fmt: skip

    root = built_once(tmp_path_factory, "compose-chains", build)
    return {family: root / family / "lora" for family in tiny_models}


def _encoder(family, tiny_models, chains):
    from clif.generate import load_pipeline
    from clif.models import from_pipeline

    pipe, fam = load_pipeline(str(tiny_models[family]), str(chains[family]), device="cpu", dtype=torch.float32)
    return isolate.Encoder(pipe, from_pipeline(pipe, fam, str(tiny_models[family])))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_splice_positions_weight_and_masked_tokens(family, tiny_models, chains):
    enc = _encoder(family, tiny_models, chains)
    prompt = f"a {A} and a {B}"
    ids = enc.ids([prompt])
    full = enc.encode(ids)[0]
    # BOS a <redball> <redball>_1 and a <bluebox> <bluebox>_1 EOS: two vectors per concept
    assert enc.positions(ids[0][0], A) == [2, 3] and enc.positions(ids[0][0], B) == [6, 7]
    out, pooled, pos = isolate.isolated(enc, prompt, [A, B], by="mask", weight=1.0, end="keep")
    assert pos == {A: [2, 3], B: [6, 7]}
    changed = (out[0] != full[0]).any(-1).nonzero().flatten().tolist()
    assert {6, 7} <= set(changed) <= {2, 3, 6, 7}  # only concept positions are spliced
    torch.testing.assert_close(out[0, [2, 3]], full[0, [2, 3]])  # causal: the first concept never read the second
    if pooled is not None:
        assert torch.equal(pooled, enc.encode(ids)[1])  # the pooled embedding stays the full prompt's
    # masked: <bluebox>'s states no longer depend on <redball>'s embedding rows
    emb = enc.model.text_encoders[0].get_input_embeddings().weight
    rows = [int(i) for i in ids[0][0, [2, 3]]]
    saved = emb.data[rows].clone()
    try:
        emb.data[rows] += 1.0
        moved = isolate.isolated(enc, prompt, [A, B], by="mask", weight=1.0, end="keep")[0]
        assert torch.equal(moved[0, [6, 7]], out[0, [6, 7]])
        assert not torch.equal(enc.encode(ids)[0][0, [6, 7]], full[0, [6, 7]])  # without isolation they do
    finally:
        emb.data[rows] = saved
    # pad: the other concept's ids become the padding token; weight is a straight line between full and isolated
    padded = [x.clone() for x in ids]
    for x, tok in zip(padded, enc.model.tokenizers):
        x[0, [2, 3]] = tok.pad_token_id
    want = enc.encode(padded)[0][0, [6, 7]]
    got = isolate.isolated(enc, prompt, [A, B], by="pad", weight=1.0, end="keep")[0]
    assert torch.equal(got[0, [6, 7]], want)
    assert torch.equal(isolate.isolated(enc, prompt, [A, B], by="pad", weight=0.0, end="keep")[0], full)
    half = isolate.isolated(enc, prompt, [A, B], by="pad", weight=0.5, end="keep")[0]
    torch.testing.assert_close(half[0, [6, 7]], 0.5 * (full[0, [6, 7]] + want))
    # clean end: EOS onward from the prompt with both concepts hidden
    clean = isolate.isolated(enc, prompt, [A, B], by="mask", weight=1.0, end="clean")[0]
    mask = torch.ones_like(ids[0])
    mask[0, [2, 3, 6, 7]] = 0
    assert torch.equal(clean[0, 9:], enc.encode(ids, mask)[0][0, 9:])
    assert torch.equal(clean[0, :6], full[0, :6])


def test_leak_of_spliced_states(tiny_models, chains):
    """The probe reads what generation reads: 'alone' splices each concept's states from 'a <c>', the probe's own
    single-concept reference, so the leak is exactly 0; without isolation it is not."""
    from clif.compose.plan import Options
    from clif.eval.leak import TextProbe

    stage, base = str(chains["sd15"]), str(tiny_models["sd15"])
    texts = {"redball": A, "bluebox": B}
    plain = TextProbe(base, stage).leaks(texts)
    alone = TextProbe(base, stage, Options(isolate="alone")).leaks(texts)
    assert all(v["leak"] == 0.0 for v in alone.values()), alone
    assert all(abs(v["leak"]) > 1e-4 for v in plain.values()), plain


# ---- inference.py end to end


def _gen(model, stage, out, *extra, prompt=TWO, n=2):
    return inference.main(
        [
            "--pretrained_model_name_or_path",
            str(model),
            "--stage_dir",
            str(stage),
            "--prompt",
            prompt,
            "--num_images_per_prompt",
            str(n),
            "--batch_size",
            str(n),
            "--num_inference_steps",
            "3",
            "--output_dir",
            str(out),
            *extra,
        ]
    )


def _pixels(paths):
    return [np.asarray(Image.open(p)) for p in paths]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_embeddings_reproduce_bitwise_in_stock_diffusers(family, tiny_models, chains, tmp_path):
    model, stage = tiny_models[family], chains[family]
    paths = _gen(model, stage, tmp_path / "iso", "--regions", "none", "--isolate", "mask", "--save_prompt_embeds")
    side = json.loads(paths[0].with_suffix(".json").read_text())
    assert side["composition"]["isolation"] == {"by": "mask", "weight": 1.0, "end": "keep"}
    emb = load_file(str(tmp_path / "iso" / side["prompt_embeds"]))
    pipe = stock_pipeline(model, family, stage)
    call = {"prompt_embeds": emb["prompt_embeds"][None].repeat(2, 1, 1)}
    if family == "sdxl":
        call["pooled_prompt_embeds"] = emb["pooled_prompt_embeds"][None].repeat(2, 1)
    stock = pipe(
        **call,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)],
        num_inference_steps=3,
        height=64,
        width=64,
    ).images
    for x, y in zip(_pixels(paths), stock):
        assert np.array_equal(x, np.asarray(y))
    plain = _pixels(_gen(model, stage, tmp_path / "plain", "--regions", "none"))
    assert not all(np.array_equal(x, y) for x, y in zip(plain, _pixels(paths)))  # isolation changed the image
    from clif.generate import remake

    assert np.array_equal(np.asarray(remake(paths[0].with_suffix(".json"))), _pixels(paths)[0])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.heavy(14)
def test_regions_in_inference(family, tiny_models, chains, tmp_path):
    model, stage = tiny_models[family], chains[family]
    plain = _pixels(_gen(model, stage, tmp_path / "plain", "--regions", "none"))
    paths = _gen(model, stage, tmp_path / "reg", "--save_attention_maps")  # the default: regions, class prompts
    side = json.loads(paths[0].with_suffix(".json").read_text())
    reg = side["composition"]["regions"]
    assert reg["source"] == "layout words" and reg["boxes"] == {A: list(LEFT), B: list(RIGHT)}
    assert reg["prompts"][B] == TWO.replace(A, "ball") and reg["region_prompt"] == "class"  # the tiny set's classes
    assert (tmp_path / "reg" / side["attention_maps"]).is_file()
    maps = load_file(str(paths[0].with_name(paths[0].stem + ".attention.safetensors")))["maps"]
    assert maps.shape == (2, 8, 8) and torch.isfinite(maps).all()
    # 'class' region prompts: the right region's prompt has no <redball> token, the left one's no <bluebox>
    assert (maps[0, :, -2:] == 0).all() and (maps[0, :, :2] > 0).all()
    assert (maps[1, :, :2] == 0).all() and (maps[1, :, -2:] > 0).all()
    assert not all(np.array_equal(x, y) for x, y in zip(plain, _pixels(paths)))
    from clif.generate import remake  # the sidecar alone re-makes a regional image (image 1 of its batch of 2)

    assert np.array_equal(np.asarray(remake(paths[1].with_suffix(".json"))), _pixels(paths)[1])
    # regions from the first steps' attention maps: no boxes, no layout words
    att = _gen(model, stage, tmp_path / "att", "--regions", "attention", prompt=f"{A} hugging {B}")
    side = json.loads(att[1].with_suffix(".json").read_text())["composition"]["regions"]
    assert side["source"] == "attention maps" and side["boxes"] is None
    plain_hug = _pixels(_gen(model, stage, tmp_path / "hug", "--regions", "none", prompt=f"{A} hugging {B}"))
    assert not all(np.array_equal(x, y) for x, y in zip(plain_hug, _pixels(att)))
    assert np.array_equal(np.asarray(remake(att[1].with_suffix(".json"))), _pixels(att)[1])
    # strength 0: the regions act with zero weight, the image is the plain one, bit for bit
    zero = _pixels(_gen(model, stage, tmp_path / "zero", "--region_strength", "0"))
    assert all(np.array_equal(x, y) for x, y in zip(plain, zero))


def test_single_concept_prompt_runs_as_before(tiny_models, chains, tmp_path):
    model, stage = tiny_models["sd15"], chains["sd15"]
    one = f"a photo of a {A}"
    plain = _gen(model, stage, tmp_path / "plain", prompt=one)
    composed = _gen(model, stage, tmp_path / "comp", "--regions", "auto", "--isolate", "mask", prompt=one)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(plain), _pixels(composed)))
    side = json.loads(composed[0].with_suffix(".json").read_text())["composition"]
    assert side == {"concepts": [A], "multi_concept": False, "regions": None, "isolation": None}
