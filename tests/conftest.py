"""Session fixtures: tiny sd15/sdxl pipelines saved to disk (the real loading path runs) and concept sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from clif.tiny import build

    return build("sd15", tmp_path_factory.mktemp("tiny") / "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from clif.tiny import build

    return build("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_models(tiny_sd15, tiny_sdxl) -> dict[str, Path]:
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


@pytest.fixture(scope="session")
def concept_set(tmp_path_factory) -> Path:
    from clif.synthetic import write_concept_set

    return write_concept_set(tmp_path_factory.mktemp("data") / "set", n_concepts=2, n_images=3)


def ti_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a tiny, fast stage-2 run."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        "64",
        "--train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_train_steps",
        "3",
        "--learning_rate",
        "0.05",
        "--report_to",
        "none",
        *extra,
    ]


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's main(argv); returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err
