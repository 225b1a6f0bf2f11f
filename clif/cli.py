"""Command-line helpers shared by every script: the parser, one-line errors at the top of a run, the common flags."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from collections.abc import Iterator

from clif.concepts import BALANCES
from clif.errors import RunFailed, UserError
from clif.outputs.outdir import held_locks, release_locks

SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; derived seeds (seed + k) must stay below 2**64


# Every flag changes a run's result, and a resume with it changed is refused (outputs/checkpoint.check_resumable),
# unless it is declared through harmless(): logging, checkpoint and validation cadence, where files go,
# memory/speed trades that compute the same numbers, and the run's length (a resume may continue a run further).
# A new flag is result-changing until someone says otherwise.
HARMLESS: set[str] = set()
# Result-changing flags added after runs were made: the value in effect for a checkpoint whose manifest predates
# the flag, so that resuming such a checkpoint with another value is refused as well.
BEFORE_FLAG: dict[str, object] = {"concept_balance": "images", "segmix_prob": 0.0}


def harmless(action: argparse.Action) -> argparse.Action:
    """Mark the flag `add_argument` just declared as not changing the result: a resume may change it."""
    HARMLESS.add(action.dest)
    return action


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump), exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes '-1e-3' or '-inf' for an option ("expected one argument"): let the type check say why
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def make_parser(prog: str, description: str) -> Parser:
    return Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def run_script(prog: str, parser: argparse.ArgumentParser, run, argv: list[str] | None):
    """A script's main(): parse `argv`, call `run(args)` and return its result; a UserError or RunFailed inside
    becomes one stderr line and its exit code (user_errors)."""
    args = parser.parse_args(argv)
    with user_errors(prog):
        return run(args)


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn a UserError (exit code 2) or RunFailed (exit code 1) raised inside the block into one stderr line."""
    before = held_locks()
    try:
        yield
    except (UserError, RunFailed) as err:
        msg = str(err).replace("\n", " ")
        sys.stderr.write(f"{prog}: error: {msg}\n")
        raise SystemExit(2 if isinstance(err, UserError) else 1) from None
    finally:
        release_locks(keep=before)  # the locks this run took, also when it fails


def number(kind: type = float, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    """argparse type: a finite number in [lo, hi] (an end excluded when `*_open`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = lo is not None and (value < lo or (lo_open and value == lo))
        too_high = hi is not None and (value > hi or (hi_open and value == hi))
        if too_low or too_high:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            if hi is None:
                need = f"{'>' if lo_open else '>='} {lo}"
            else:
                need = f"in {left}{lo}, {hi}{right}"
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    return parse


def positive(kind: type = int):
    """argparse type: a strictly positive finite number."""
    return number(kind, 0, lo_open=True)


def count(hi: int):
    """argparse type: a whole count from 1 to `hi` (a cap against a few zeros too many; the error states it)."""
    return number(int, 1, hi)


def non_negative(kind: type = int):
    """argparse type: a finite number >= 0."""
    return number(kind, 0)


def image_size():
    """argparse type: an image side in pixels, a positive multiple of 8 (the VAE downsamples by 8)."""
    side = positive(int)

    def parse(text: str) -> int:
        value = side(text)
        if value % 8:
            raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {text}")
        return value

    return parse


def seed_type():
    """argparse type: a seed torch accepts, also after the small offsets derived seeds add."""
    return number(int, 0, SEED_LIMIT, hi_open=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags naming the base model."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="Hub id (e.g. runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0) "
        "or a local diffusers pipeline folder (e.g. one written by `python -m clif.fixtures.tiny`).",
    )
    g.add_argument("--revision", default=None, help="Hub revision of the base model.")
    g.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")


def add_stage_arg(p: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    """--stage_dir: the output folder of an earlier stage (its manifest names tokens, embeddings and LoRA)."""
    p.add_argument("--stage_dir", required=required, default=None, help=help)


def add_data_args(p: argparse.ArgumentParser, *, images: bool = True) -> None:
    """Flags naming the concept set (dataset/README.md) and, with `images`, the image preprocessing."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--train_data_dir",
        required=True,
        help="Concept set: a folder with concepts.json, or a folder of one sub-folder of images per "
        "concept (then --initializer/--class_word or a classes.json apply).",
    )
    g.add_argument(
        "--initializer",
        default=None,
        help="Plain folders only: initializer word for every concept (default: its class word).",
    )
    g.add_argument(
        "--class_word",
        default=None,
        help="Plain folders only: class word for every concept (default: classes.json, else 'object').",
    )
    g.add_argument(
        "--num_vectors",
        type=positive(int),
        default=2,
        help="Embedding vectors per placeholder token (plain folders; concepts.json may set its own).",
    )
    harmless(
        g.add_argument(
            "--allow_word_names",
            action="store_true",
            help="Accept concept names that are words of the base tokenizer (e.g. 'cat'), with a warning: A1111, "
            "ComfyUI and kohya take the embedding file's name as its trigger word (dataset/README.md).",
        )
    )
    add_balance_arg(g)
    if not images:
        return
    g.add_argument(
        "--learnable_property",
        choices=["object", "style"],
        default="object",
        help="Which caption templates fill the token.",
    )
    g.add_argument("--resolution", type=image_size(), default=512, help="Training resolution (multiple of 8).")
    g.add_argument(
        "--center_crop",
        action="store_true",
        help="Center-crop to a square before resizing (else the whole image is resized to a square).",
    )
    g.add_argument("--random_flip", action="store_true", help="Horizontally flip half of the training samples.")
    harmless(
        g.add_argument(
            "--dataloader_num_workers",
            type=non_negative(int),
            default=0,
            help="Worker processes that decode and preprocess the images (done once, before training).",
        )
    )
    g.add_argument(
        "--cache_latents",
        action="store_true",
        help="VAE-encode every training image and its flipped copy once, then free the VAE.",
    )


def add_balance_arg(p) -> None:
    """--concept_balance: how the samples are shared among concepts (stages 1-3 and the pair preview)."""
    p.add_argument(
        "--concept_balance",
        choices=BALANCES,
        default="concepts",
        help="'concepts': every concept gets the same share of the training samples (stage 1: of the Global and "
        "Region pairs) whatever its image count, times its 'repeats' (concepts.json); 'images': every image "
        "counts once, times its concept's repeats (kohya's num_repeats), so a concept with more images trains more.",
    )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def add_compile_args(p: argparse.ArgumentParser) -> None:
    """--torch_compile and --compile_mode (stages 2 and 3). Both count as result-changing: compiled kernels round
    differently from eager ones, so a resume keeps the setting it was started with."""
    g = p.add_argument_group("speed")
    g.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the UNet's training forward/backward with torch.compile (inductor). The first step pays the "
        "compile (minutes for a full UNet); it pays off over long runs (README, Performance).",
    )
    g.add_argument(
        "--compile_mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode: 'reduce-overhead' adds CUDA graphs (CUDA only), 'max-autotune-no-cudagraphs' "
        "searches kernels longer.",
    )


def add_training_args(p: argparse.ArgumentParser, *, lr: float, steps: int, validation: bool = True) -> None:
    """Optimisation, precision, checkpointing, validation and logging flags shared by the training stages."""
    g = p.add_argument_group("optimisation")
    harmless(g.add_argument("--output_dir", required=True, help="Where the stage writes its files (docs/formats.md)."))
    harmless(
        g.add_argument(
            "--overwrite",
            action="store_true",
            help="Replace an output dir that holds another CLIF run (refuses to delete other folders).",
        )
    )
    g.add_argument("--seed", type=seed_type(), default=0, help="Seed of every random draw; same seed, same result.")
    g.add_argument("--train_batch_size", type=positive(int), default=1, help="Batch size per process.")
    g.add_argument(
        "--gradient_accumulation_steps",
        type=positive(int),
        default=4,
        help="Micro-batches accumulated into one optimizer step.",
    )
    harmless(
        g.add_argument(
            "--max_train_steps",
            type=positive(int),
            default=None,
            help=f"Optimizer steps; overrides --num_train_epochs (default {steps} when neither is set).",
        )
    )
    harmless(
        g.add_argument("--num_train_epochs", type=positive(int), default=None, help="Epochs over the concept images.")
    )
    g.add_argument("--learning_rate", type=positive(float), default=lr, help="Peak learning rate.")
    g.add_argument(
        "--scale_lr", action="store_true", help="Multiply the lr by batch size x accumulation x number of processes."
    )
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule.",
    )
    g.add_argument("--lr_warmup_steps", type=non_negative(int), default=0, help="Warm-up steps of the schedule.")
    g.add_argument("--adam_beta1", type=number(float, 0, 1, hi_open=True), default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=number(float, 0, 1, hi_open=True), default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=non_negative(float), default=0.0, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=positive(float), default=1e-8, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=positive(float), default=1.0, help="Gradient clipping norm.")
    g.add_argument(
        "--use_8bit_adam",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bitsandbytes 8-bit AdamW (CUDA only).",
    )
    g.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Precision of the frozen weights and the autocast (default: accelerate config).",
    )
    harmless(
        g.add_argument(
            "--gradient_checkpointing",
            action="store_true",
            help="Recompute activations in the backward pass (less memory, slower).",
        )
    )
    g.add_argument("--noise_offset", type=non_negative(float), default=0.0, help="Noise offset (0 = off).")
    g = p.add_argument_group("checkpoints, validation, logging")
    harmless(
        g.add_argument(
            "--checkpointing_steps", type=positive(int), default=500, help="Save a resumable checkpoint every N steps."
        )
    )
    harmless(
        g.add_argument(
            "--checkpoints_total_limit", type=positive(int), default=None, help="Keep at most N checkpoints."
        )
    )
    harmless(
        g.add_argument(
            "--resume_from_checkpoint",
            default=None,
            help="A checkpoint-<step> folder, or 'latest' (the newest in --output_dir).",
        )
    )
    harmless(
        g.add_argument(
            "--report_to",
            default="tensorboard",
            choices=["tensorboard", "wandb", "all", "none"],
            help="Experiment tracker (logs go to <output_dir>/logs).",
        )
    )
    if not validation:
        p.set_defaults(validation_prompt=[])
        return
    harmless(
        g.add_argument(
            "--validation_prompt",
            action="append",
            default=[],
            help="Prompt rendered during training (repeatable); write the concept token, e.g. '<dog2> on a beach'.",
        )
    )
    harmless(
        g.add_argument(
            "--validation_steps", type=positive(int), default=100, help="Render validation images every N steps."
        )
    )
    harmless(
        g.add_argument("--num_validation_images", type=positive(int), default=2, help="Images per validation prompt.")
    )
    harmless(
        g.add_argument(
            "--validation_inference_steps", type=positive(int), default=25, help="Denoising steps of validation images."
        )
    )
