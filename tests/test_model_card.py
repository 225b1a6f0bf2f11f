"""Each stage's output folder carries a README.md model card: base model, trigger tokens, the stage chain, key
arguments, how to load it, the last validation grid; written before the manifest, so a finished folder has one."""

from __future__ import annotations

import re

from conftest import ti_args

import train_lora
import train_ti
from clif.outputs import outdir


def test_stage_folders_carry_a_model_card(tiny_sd15, concept_set, tmp_path):
    s2, s3 = tmp_path / "s2", tmp_path / "s3"
    train_ti.main(ti_args(tiny_sd15, concept_set, s2, "--max_train_steps", "2", "--validation_prompt", "a <redball>",
                          "--validation_steps", "1", "--num_validation_images", "1",
                          "--validation_inference_steps", "2"))
    card = (s2 / "README.md").read_text()
    assert f"base_model: {tiny_sd15}" in card and "stage 2, textual inversion" in card
    assert "`<redball>`" in card and "`<bluebox>`" in card and "- `--max_train_steps` 3" not in card
    assert "- `--max_train_steps` 2" in card and "- `--seed` 0" in card
    assert 'pipe.load_textual_inversion("<this folder>/embeddings/redball.safetensors")' in card
    grid = re.search(r"!\[validation\]\((.+)\)", card).group(1)
    assert grid == "validation/step-000002.png" and (s2 / grid).is_file()  # the last grid
    assert (s2 / "checkpoint-2" / "README.md").is_file()  # a checkpoint is a usable stage dir too
    assert "../validation/" in (s2 / "checkpoint-2" / "README.md").read_text()
    assert outdir.is_clif_run(s2)  # --overwrite still recognises the folder as ours

    train_lora.main(["--pretrained_model_name_or_path", str(tiny_sd15), "--train_data_dir", str(concept_set),
                     "--stage_dir", str(s2), "--output_dir", str(s3), "--resolution", "64", "--max_train_steps", "1",
                     "--gradient_accumulation_steps", "1", "--report_to", "none", "--export_kohya", "--rank", "2"])
    card = (s3 / "README.md").read_text()
    assert "stage 2, textual inversion (train_ti.py) -> stage 3, LoRA + embeddings (train_lora.py)" in card
    assert 'pipe.load_lora_weights("<this folder>")' in card and "- `--rank` 2" in card
    assert "`s3_kohya.safetensors`" in card and "networks.lora" in card
    assert "Last validation grid" not in card  # no validation prompt: no grid to show
    # two concepts: how to prompt both, and inference.py's multi-concept default exactly as the options define it
    from clif.compose.plan import Options
    from clif.outputs.model_card import MULTI_CONCEPT_DEFAULT

    assert MULTI_CONCEPT_DEFAULT == Options().default_flags()
    assert "a photo of a <redball> on the left and a <bluebox> on the right" in card
    assert (f"`{MULTI_CONCEPT_DEFAULT}` by default" if MULTI_CONCEPT_DEFAULT else "none by default") in card
