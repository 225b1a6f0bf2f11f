"""Every random stream comes from --seed (clif/seeds.py): the streams are named, and the stage-1 LoRA follows it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_clif
from clif import lora, seeds


def clif_args(model, data, out, cache, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--cache_dir", str(cache), "--report_to", "none", "--num_pairs", "16", "--train_batch_size", "4",
            "--max_train_steps", "1", "--train_text_encoder", "lora", *extra]


def test_streams_are_named_and_derived_from_the_seed():
    assert {"data_order", "noise", "dropout", "lora_init", "augmentation", "probe", "prior_data", "prior_noise",
            "validation", "generated", "segmix", "segmix_order"} == set(seeds.STREAMS)
    # the offsets the streams always had: resumed and reproduced runs keep their numbers
    assert seeds.stream(5, "noise") == 5 and seeds.stream(5, "prior_noise") == 6 and seeds.stream(5, "probe") == 10_005
    assert seeds.element(3, 7) == 3 * 1_000_003 + 7 and seeds.element(2**63 - 1, 0) < 2**64
    with pytest.raises(KeyError):
        seeds.stream(0, "unnamed")


def test_stage1_text_encoder_lora_init_follows_the_seed(tiny_sd15, concept_set, tmp_path, monkeypatch):
    """The stage-1 text-encoder LoRA starts from --seed's lora_init stream (it used to start from seed 0 always)."""
    used = []
    real = lora.add_lora

    def spy(*a, **kw):
        used.append(kw.get("seed", "default"))
        return real(*a, **kw)

    monkeypatch.setattr(lora, "add_lora", spy)
    # a learning rate so small that the saved LoRA is its initial value: the init itself is compared
    runs = {}
    for seed in ("7", "8"):
        out = tmp_path / f"s{seed}"
        train_clif.main(clif_args(tiny_sd15, concept_set, out, tmp_path / "c", "--seed", seed,
                                  "--text_encoder_lr", "1e-12"))
        runs[seed] = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert used and set(used) == {seeds.stream(7, "lora_init"), seeds.stream(8, "lora_init")}
    down = [k for k in runs["7"] if k.endswith("down.weight") or "lora_A" in k]
    assert down and not any(torch.allclose(runs["7"][k], runs["8"][k], atol=1e-6) for k in down)
