"""Session fixtures: tiny sd15/sdxl pipelines saved to disk (the real loading path runs) and concept sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# A guard against a hung child process, never a verdict: a subprocess that runs for minutes on a loaded 2-core
# machine (the suite once took 75 min while other jobs ran) must still pass. An hour stops only a real hang.
HANG_GUARD_S = 3600


def needs_data(*names: str):
    """Mark a test that reads real photos from ../shared/data/<name>: skipped when absent, failed under CI=true."""
    return pytest.mark.needs_data(*names)


def data_gate(names, root: Path, ci: bool) -> tuple[str, str] | None:
    """None when every data set is there, else ('skip' or 'fail', reason): CI must not pass without its fixtures."""
    missing = [n for n in names if not (root / n).is_dir()]
    if not missing:
        return None
    reason = f"{root / missing[0]} absent"
    return ("fail", f"{reason} (CI=true: real-photo tests may not skip)") if ci else ("skip", reason)


def heavy_first(items) -> None:
    """Sort `items` in place: the tests marked `heavy(seconds)` first, longest first, then the rest in pytest's order.

    scripts/test.sh hands pytest-xdist's workers one test at a time (`--maxschedchunk 1`), so with the longest tests
    first the two workers finish together: with pytest's order a two-minute test near the end ran alone on one worker
    while the other sat idle. The seconds are a test's cost from a fresh clone on 2 cores, rounded; only the order
    uses them."""
    def cost(item) -> float:
        mark = item.get_closest_marker("heavy")
        return -float(mark.args[0]) if mark else 0.0

    items.sort(key=cost)  # stable: equal costs keep pytest's order


def pytest_collection_modifyitems(items):
    heavy_first(items)


def pytest_collection_finish(session):
    """Import what the tests' training and inference runs import (torch, diffusers, transformers, accelerate: ~500,000
    long-lived objects), then move every object alive out of the garbage collector's reach: each later full
    collection scans only what the tests make (0.2 s less for each of the hundreds of gc.collect() calls the runs
    and libraries make). Nothing a test creates is frozen."""
    import gc

    import accelerate  # noqa: F401
    import diffusers
    import transformers

    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "UNet2DConditionModel", "AutoencoderKL"):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "CLIPModel"):
        getattr(transformers, name)
    gc.collect()
    gc.freeze()


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_data"):
        gate = data_gate(mark.args, SHARED_DATA, os.environ.get("CI", "").lower() in ("true", "1"))
        if gate is not None:
            (pytest.fail if gate[0] == "fail" else pytest.skip)(gate[1])


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test session, shared by the pytest-xdist workers: the first worker to ask builds into
    the session's common temporary folder under an exclusive lock; the others wait for it and reuse the folder (so
    a fixture costs once, not once per worker). The builder must write only `folder`, and its users only read it."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <session>/popen-gwN: the session's folder is common to the workers
        root = root.parent
    folder, done = root / "built-once" / name, root / "built-once" / f"{name}.done"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(root / "built-once" / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if the build fails
        if not done.exists():
            build(folder)
            done.touch()
    return folder


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a run with another precision needs it reset, before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    """Built once for all workers (built_once): the stage folders other fixtures build once name this path."""
    from clif.fixtures.tiny import build

    return built_once(tmp_path_factory, "tiny_sd15", lambda out: build("sd15", out / "sd15")) / "sd15"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from clif.fixtures.tiny import build

    return built_once(tmp_path_factory, "tiny_sdxl", lambda out: build("sdxl", out / "sdxl")) / "sdxl"


@pytest.fixture(scope="session")
def tiny_models(tiny_sd15, tiny_sdxl) -> dict[str, Path]:
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


@pytest.fixture(scope="session")
def concept_set(tmp_path_factory) -> Path:
    from clif.fixtures.synthetic import write_concept_set

    return built_once(tmp_path_factory, "concept_set", lambda out: write_concept_set(out / "set", n_concepts=2,
                                                                                      n_images=3)) / "set"


def colour_histogram(images):
    """Controlled image features for metric tests: a 4x4x4 colour histogram per image (float64 rows)."""
    import numpy as np
    import torch

    out = []
    for im in images:
        a = np.asarray(im.convert("RGB").resize((64, 64))) // 64
        idx = a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]
        out.append(torch.tensor(np.bincount(idx.ravel(), minlength=64), dtype=torch.float64))
    return torch.stack(out)


def side_by_side(left: Path, right: Path, size: int = 64):
    """A two-up test image: `left` and `right` resized to size x size, next to each other."""
    from PIL import Image

    im = Image.new("RGB", (2 * size, size))
    im.paste(Image.open(left).convert("RGB").resize((size, size)), (0, 0))
    im.paste(Image.open(right).convert("RGB").resize((size, size)), (size, 0))
    return im


def ti_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a tiny, fast stage-2 run."""
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_train_steps", "3", "--learning_rate", "0.05", "--report_to", "none", *extra]


def lora_args(model: Path, data: Path, stage: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a tiny, fast stage-3 run on top of the stage-2 output `stage`."""
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--stage_dir", str(stage),
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--max_train_steps", "3", "--learning_rate", "5e-3",
            "--embedding_learning_rate", "1e-2", "--rank", "4", "--lora_alpha", "2", "--report_to", "none", *extra]


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's main(argv); returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def load_embedding(pipe, family: str, token: str, state: dict) -> None:
    """One concept into a stock pipeline: SDXL needs a call per text encoder (as the README shows)."""
    if family == "sdxl":
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:
        pipe.load_textual_inversion(next(iter(state.values())), token=token)


def stock_pipeline(model: Path, family: str, stage: Path | None = None, *, lora: bool = True):
    """The README's stock-diffusers snippet: base pipeline + every embedding file of `stage` (+ its LoRA)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    pipe = DiffusionPipeline.from_pretrained(model, **({} if family == "sdxl" else {"safety_checker": None}))
    if stage is not None:
        for f in sorted((stage / "embeddings").glob("*.safetensors")):
            if family == "sdxl":
                load_embedding(pipe, family, f"<{f.stem}>", load_file(str(f)))
            else:
                pipe.load_textual_inversion(str(f))  # SD 1.x/2.x: the file alone
        if lora and (stage / "pytorch_lora_weights.safetensors").exists():
            pipe.load_lora_weights(str(stage))
    return pipe
