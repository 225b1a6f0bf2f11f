"""Setting a training stage up (concepts, model, tokens, start rows) and writing its outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from clif import cli, full_text, lora, seeds, tokens, validate
from clif.concepts import Concept, check_tokens, data_fingerprint, load_concept_set
from clif.errors import UserError
from clif.models import DiffusionModel, detect_family, load_model, read_text_side
from clif.outputs import artifacts, outdir
from clif.outputs.model_card import write_model_card

# folders a run reads (or caches into): the output dir may not be, contain or lie inside one of them
INPUT_FLAGS = ("train_data_dir", "stage_dir", "pretrained_model_name_or_path", "class_data_dir", "cache_dir")


@dataclass
class StageInputs:
    """Everything validated before the first expensive step."""

    concepts: list[Concept]
    model: DiffusionModel
    start_rows: list[list[torch.Tensor]]  # per concept, per encoder: [num_vectors, D]
    fingerprint: str
    first_new_id: int
    stage_manifest: dict | None
    resume_path: Path | None = None  # checkpoint to continue from (--resume_from_checkpoint)
    text_lora: bool = False  # the earlier stage trained a text-encoder LoRA: loaded here, carried forward
    data_fingerprint: str = ""  # hash of the concept images: a resume must see the same data
    whole_encoder: bool = False  # the earlier stage left whole fine-tuned text encoders: loaded, carried forward


def prepare(
    args,
    *,
    stage_required: bool = False,
    text_only: bool = False,
    check: Callable[[list[Concept]], None] | None = None,
) -> StageInputs:
    """Validate the run (output dir, checkpoint, optimizer flags), read the concept set, the base model and
    (optionally) an earlier stage dir; add the placeholder tokens. `check(concepts)`: the stage's own checks of the
    concept set (tokens final), before the weights load. Nothing is written."""
    from clif.outputs import checkpoint
    from clif.train.compiled import check_compile
    from clif.train.training import check_optimizer_flags

    outdir.check_output_dir(
        args.output_dir,
        overwrite=args.overwrite,
        resuming=args.resume_from_checkpoint is not None,
        inputs=[(f"--{k}", getattr(args, k, None)) for k in INPUT_FLAGS],
    )
    resume_path = checkpoint.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_optimizer_flags(args)
    check_compile(
        torch_compile=getattr(args, "torch_compile", False),
        mode=getattr(args, "compile_mode", "default"),
        cuda=torch.cuda.is_available(),
        prior_preservation=getattr(args, "with_prior_preservation", False),
    )
    validate.check_tracker(getattr(args, "report_to", "none"))
    for k in ("class_data_dir", "cache_dir"):  # folders the run fills
        validate.folder_or_absent(getattr(args, k, None), f"--{k}")
    concepts = load_concept_set(
        args.train_data_dir, initializer=args.initializer, class_word=args.class_word, num_vectors=args.num_vectors
    )
    stage_dir = getattr(args, "stage_dir", None)
    if stage_required and not stage_dir:
        raise UserError("--stage_dir is required (the output of an earlier stage)")
    manifest = artifacts.read_manifest(stage_dir) if stage_dir else None
    base = args.pretrained_model_name_or_path
    # everything the tokenizer and config files can tell is checked before the weights load (minutes on SDXL)
    family = detect_family(base, args.revision)
    toks, widths = read_text_side(base, family, args.revision)
    saved: dict = {}
    if manifest is not None:
        artifacts.check_stage_compatible(manifest, stage_dir, family, None, base)
        saved = artifacts.stage_rows(manifest, stage_dir, family, widths)
        missing = [c.name for c in concepts if c.name not in saved]
        if missing:
            raise UserError(f"{stage_dir} has no embeddings for concept(s) {', '.join(missing)}")
        for c in concepts:  # token and vector count are fixed by the earlier stage
            entry = saved[c.name][0]
            c.token, c.num_vectors = entry["token"], int(entry["num_vectors"])
        check_tokens(concepts, str(stage_dir))
    tokens.check_vocabulary(toks, concepts)
    tokens.check_word_names(toks[0], concepts, allow=getattr(args, "allow_word_names", False))
    data = data_fingerprint(concepts)
    if resume_path is not None:  # before run_args.json or anything else is rewritten
        checkpoint.check_resumable(
            resume_path, concepts, vars(args), data, harmless=cli.HARMLESS, before=cli.BEFORE_FLAG
        )
    if check is not None:
        check(concepts)
    model = load_model(base, revision=args.revision, variant=args.variant, text_only=text_only)
    fingerprint = model.fingerprint()
    if manifest is not None:
        artifacts.check_stage_compatible(manifest, stage_dir, model.family, fingerprint, base)
    whole = manifest is not None and full_text.load(stage_dir, model)  # before any adapter or new token
    if whole and getattr(args, "train_text_encoder_lora", False):
        raise UserError(
            f"--train_text_encoder_lora: {stage_dir} carries a whole fine-tuned text encoder (stage 1 "
            "--train_text_encoder full); a LoRA on top of it is not supported"
        )
    text_lora = manifest is not None and lora.load_text_lora(stage_dir, model)
    first_new_id = len(model.tokenizers[0])
    tokens.add_placeholder_tokens(model.tokenizers, concepts)
    start = []
    for c in concepts:
        if c.name in saved:
            start.append([r.float() for r in saved[c.name][1]])
        else:
            start.append([tokens.initializer_rows(t, e, c) for t, e in zip(model.tokenizers, model.text_encoders)])
    return StageInputs(concepts, model, start, fingerprint, first_new_id, manifest, resume_path, text_lora, data, whole)


def install_embeddings(inp: StageInputs) -> list[tokens.ConceptEmbedding]:
    """Put the trainable rows (fp32) into every text encoder of the model."""
    per_encoder = [[rows[e] for rows in inp.start_rows] for e in range(len(inp.model.text_encoders))]
    return tokens.install(inp.model.text_encoders, per_encoder, inp.first_new_id)


def lora_trainables(
    inp: StageInputs, args, *, lr: float, alpha: float, targets: list[str]
) -> tuple[list[dict], dict[str, torch.nn.Parameter], list[tokens.ConceptEmbedding]]:
    """Stage 3's optimizer groups, checkpoint names and concept-row modules: the UNet LoRA; with
    --train_text_encoder_lora the text encoders' LoRA (continued when stage 1 left one); the concept rows
    unless --embedding_learning_rate is 0."""
    model = inp.model

    init = seeds.stream(args.seed, "lora_init")
    unet = lora.add_lora(model.unet, rank=args.rank, alpha=alpha, dropout=args.lora_dropout, targets=targets, seed=init)
    groups = [{"params": unet, "lr": lr}]
    trainables = lora.named_lora_params(model.unet, "unet")
    if args.train_text_encoder_lora:
        if inp.text_lora:  # stage 1 left one: it goes on training
            params = [p for enc in model.text_encoders for p in lora.make_trainable(enc)]
        else:
            params = lora.add_text_loras(model, rank=args.rank, alpha=alpha, dropout=args.lora_dropout, seed=init)
        trainables.update(lora.text_lora_trainables(model.text_encoders))
        groups.append({"params": params, "lr": args.text_encoder_lr or lr})
    # after the adapters: peft marks every parameter it finds in a module as frozen, the concept rows included
    modules = install_embeddings(inp)
    if args.embedding_learning_rate > 0:
        groups.append({"params": [m.new for m in modules], "lr": args.embedding_learning_rate})
        trainables.update({f"embedding.{i}": m.new for i, m in enumerate(modules)})
    else:
        for m in modules:
            m.new.requires_grad_(False)
    return groups, trainables, modules


def current_rows(inp: StageInputs, modules: list[tokens.ConceptEmbedding]) -> list[list[torch.Tensor]]:
    return [
        [tokens.concept_rows(m, i, inp.concepts).detach().float().cpu() for m in modules]
        for i in range(len(inp.concepts))
    ]


def write_stage_outputs(
    out: Path,
    stage: str,
    inp: StageInputs,
    modules: list[tokens.ConceptEmbedding],
    args,
    *,
    text_lora: bool = False,
    unet_lora: bool = False,
    whole_encoder: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """This stage's files into `out` (the final dir or a checkpoint): embeddings, the LoRA file when one trains,
    the whole text encoders when this or an earlier stage trained them, `extra` files, the README.md model card,
    and the manifest last, so that a folder with a manifest is always complete."""
    meta = {
        "clif.stage": stage,
        "clif.family": inp.model.family,
        "clif.base_model": str(args.pretrained_model_name_or_path),
    }
    artifacts.save_embeddings(out, inp.model.family, inp.concepts, current_rows(inp, modules), meta)
    files = {}
    if text_lora or unet_lora:
        lora.save_lora(out, inp.model, text_lora, unet=unet_lora)
        files["lora"] = [lora.LORA_FILE]
    if whole_encoder:  # trained here (stage 1 --train_text_encoder full)
        files["text_encoder"] = full_text.save(out, inp.model)
    elif inp.whole_encoder:  # trained by an earlier stage: passed on unchanged
        files["text_encoder"] = full_text.copy(args.stage_dir, out, inp.model)
    if extra is not None:
        extra(out)
    inputs = [str(Path(args.stage_dir).resolve())] if getattr(args, "stage_dir", None) else []
    write_model_card(
        out,
        stage=stage,
        family=inp.model.family,
        base=str(args.pretrained_model_name_or_path),
        concepts=inp.concepts,
        args=vars(args),
        inputs=inputs,
        files=files,
    )
    artifacts.write_manifest(
        out,
        stage=stage,
        family=inp.model.family,
        base=str(args.pretrained_model_name_or_path),
        fingerprint=inp.fingerprint,
        concepts=inp.concepts,
        args=vars(args),
        inputs=inputs,
        files=files,
        extra={"data_fingerprint": inp.data_fingerprint},
    )


def start_run(args, name: str):
    """After validation: the Accelerator, the (cleared) output dir with run_args.json, and the trackers."""
    import logging

    from clif.train.training import make_accelerator

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = make_accelerator(args, args.output_dir)
    # torch's global generator drives LoRA init and dropout: seed it, so two runs (and a resumed one) agree;
    # checkpoints save its state for dropout after a resume
    torch.manual_seed(seeds.stream(args.seed, "dropout"))
    if accelerator.is_main_process:
        outdir.open_run_dir(args.output_dir, overwrite=args.overwrite, resuming=args.resume_from_checkpoint is not None)
        artifacts.atomic_write_json(Path(args.output_dir) / "run_args.json", vars(args))
        accelerator.init_trackers(name, config={k: str(v) for k, v in vars(args).items()})
    accelerator.wait_for_everyone()
    return accelerator
