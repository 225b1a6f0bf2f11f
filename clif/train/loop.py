"""What happens around each optimizer step of a training stage: sync, clip, step, log, checkpoint, validate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clif import seeds
from clif.errors import RunFailed
from clif.images import render_validation
from clif.outputs import artifacts, checkpoint, outdir
from clif.train import compiled, training
from clif.train.data import Shard


@dataclass(frozen=True)
class Validation:
    """What the loop renders every `every` steps (validation/step-<n>.png), from its own generators."""

    prompts: list[str]
    every: int
    num_images: int
    inference_steps: int
    seed: int
    resolution: int


@dataclass(frozen=True)
class LoopSettings:
    """The flags the step loop reads, taken from the Namespace once (from_args)."""

    output_dir: Path
    accumulation: int
    max_grad_norm: float
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    validation: Validation | None = None

    @classmethod
    def from_args(cls, args) -> LoopSettings:
        validation = None
        if args.validation_prompt:
            validation = Validation(
                prompts=list(args.validation_prompt),
                every=args.validation_steps,
                num_images=args.num_validation_images,
                inference_steps=args.validation_inference_steps,
                seed=seeds.stream(args.seed, "validation"),
                resolution=args.resolution,
            )
        return cls(
            output_dir=Path(args.output_dir),
            accumulation=args.gradient_accumulation_steps,
            max_grad_norm=args.max_grad_norm,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            validation=validation,
        )


def start_loop(
    args,
    accelerator,
    model,
    *,
    groups: list[dict],
    trainables: dict[str, torch.Tensor],
    write_artifacts: Callable[[Path], None],
    num_samples: int,
    default_steps: int,
    desc: str,
    resume: Path | None,
    extra_noise: list[training.NoiseSource] = (),
    stats: Callable[[int], dict] | None = None,
) -> StepRunner:
    """The training skeleton of every stage: the number of steps, the optimizer over `groups`, the lr schedule,
    the noise stream, the step runner, and the resume from `resume` (a checkpoint folder) when given.
    `num_samples`: one epoch of the sample stream; `stats(n)`: more run_stats.json entries, from the number n of
    samples trained (what the first n samples showed of each concept)."""
    shard = Shard.of(accelerator, args.train_batch_size)
    per_step = shard.global_batch * args.gradient_accumulation_steps
    max_steps = training.resolve_steps(
        max_train_steps=args.max_train_steps,
        num_train_epochs=args.num_train_epochs,
        samples_per_step=per_step,
        num_samples=num_samples,
        default=default_steps,
    )
    optimizer = accelerator.prepare(
        training.make_optimizer(
            groups,
            eight_bit=args.use_8bit_adam,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
    )
    noise = training.NoiseSource(
        seeds.stream(args.seed, "noise"), accelerator.device, shard.global_batch, shard.rank, shard.local
    )
    runner = StepRunner(
        LoopSettings.from_args(args),
        accelerator=accelerator,
        model=model,
        params=[p for g in groups for p in g["params"]],
        optimizer=optimizer,
        lr_scheduler=training.make_lr_scheduler(
            optimizer, name=args.lr_scheduler, warmup_steps=args.lr_warmup_steps, max_steps=max_steps
        ),
        noise=noise,
        trainables=trainables,
        write_artifacts=write_artifacts,
        max_steps=max_steps,
        desc=desc,
        extra_noise=extra_noise,
        stats=(lambda step: stats(step * per_step)) if stats else None,
    )
    runner.resume(resume)
    return runner


class StepRunner:
    """Owns the optimizer, schedule, checkpoints and validation of one run; the script owns the loss."""

    def __init__(
        self,
        settings: LoopSettings,
        *,
        accelerator,
        model,
        params: list[torch.Tensor],
        optimizer,
        lr_scheduler,
        noise: training.NoiseSource,
        trainables: dict[str, torch.Tensor],
        write_artifacts: Callable[[Path], None],
        max_steps: int,
        desc: str,
        extra_noise: list[training.NoiseSource] = (),
        stats: Callable[[int], dict] | None = None,
    ):
        self.settings, self.accelerator, self.model = settings, accelerator, model
        self.params, self.optimizer, self.lr_scheduler, self.noise = params, optimizer, lr_scheduler, noise
        self.trainables, self.write_artifacts, self.max_steps = trainables, write_artifacts, max_steps
        self.generators = [noise.gen] + [n.gen for n in extra_noise]  # all saved in checkpoints
        self.out = settings.output_dir
        self.step = 0
        self.timer = training.StepTimer(accelerator.device)
        self.desc = desc
        self.bar = None
        self.losses: list[float] = []  # per optimizer step (global mean), kept in run_stats.json
        self.stats = stats  # more run_stats.json entries, from the number of steps trained

    def resume(self, path: Path | None) -> None:
        if path is not None:
            self.step = checkpoint.load_checkpoint(
                path, self.trainables, self.optimizer, self.lr_scheduler, self.accelerator.scaler, self.generators
            )

    def micro_steps(self) -> range:
        """Indices of the micro-batches of the next optimizer step (they address the sample stream)."""
        if self.bar is None:
            self.bar = tqdm(
                total=self.max_steps,
                initial=self.step,
                desc=self.desc,
                disable=not self.accelerator.is_local_main_process,
            )
        self.timer.start()
        accum = self.settings.accumulation
        return range(self.step * accum, (self.step + 1) * accum)

    @property
    def done(self) -> bool:
        return self.step >= self.max_steps

    def backward(self, loss: torch.Tensor) -> None:
        with compiled.compile_errors(self._fail):  # --torch_compile builds the compiled backward at the first one
            self.accelerator.backward(loss / self.settings.accumulation)

    def train(self, micro_step: Callable[[int], torch.Tensor], *, backward: bool = True) -> None:
        """The loop, to the last step: each optimizer step runs `micro_step(k)` (under autocast) for its
        micro-batches k and logs the mean of the losses it returns. With `backward`, the runner back-propagates
        each loss; without, `micro_step` has done it (through `self.backward`)."""
        while not self.done:
            total = 0.0
            for k in self.micro_steps():
                with self.accelerator.autocast():
                    loss = micro_step(k)
                if backward:
                    self.backward(loss)
                total += loss.detach() / self.settings.accumulation
            self.finish(total)

    def finish(self, loss: torch.Tensor, extra_logs: dict | None = None) -> None:
        """Optimizer step after the micro-batches; `loss` is their mean (for logging)."""
        acc, cfg = self.accelerator, self.settings
        training.all_reduce_grads(self.params, acc)
        grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        # the values are read for the log anyway (one sync per step, as before): check them before the update
        mean_loss, norm = acc.reduce(loss.detach().float(), "mean").item(), float(grad_norm)
        if not (math.isfinite(mean_loss) and math.isfinite(norm)):
            self._fail(
                f"step {self.step + 1}: loss {mean_loss} / gradient norm {norm} is not finite; stopped "
                f"(last good checkpoint: {_last(self.out)}); try a lower --learning_rate"
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.timer.stop()
        logs = {
            "loss": mean_loss,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "grad_norm": norm,
            **(extra_logs or {}),
        }
        acc.log(logs, step=self.step)
        self.losses.append(logs["loss"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        last = self.step == self.max_steps
        if acc.is_main_process and (self.step % cfg.checkpointing_steps == 0 or last):
            with self._disk_errors():
                checkpoint.save_checkpoint(
                    self.out,
                    self.step,
                    self.trainables,
                    self.optimizer,
                    self.lr_scheduler,
                    acc.scaler,
                    self.generators,
                    limit=cfg.checkpoints_total_limit,
                    write_artifacts=self.write_artifacts,
                )
        val = cfg.validation
        if acc.is_main_process and val is not None and (self.step % val.every == 0 or last):
            render_validation(
                self.model,
                val.prompts,
                num_images=val.num_images,
                seed=val.seed,
                steps=val.inference_steps,
                resolution=val.resolution,
                device=acc.device,
                dtype=training.frozen_dtype(acc),
                out_dir=self.out,
                step=self.step,
                accelerator=acc,
            )

    def _fail(self, message: str) -> None:
        """End the run with one line (exit 1): the progress bar is closed first so the error line is the last."""
        if self.bar is not None:
            self.bar.close()
        raise RunFailed(message)

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A failed write (disk full, permissions) ends the run with one line; complete checkpoints stay."""
        try:
            yield
        except OSError as err:
            self._fail(
                f"cannot write into {self.out}: {err.strerror or err}; last complete checkpoint: {_last(self.out)}"
            )

    def close(self) -> None:
        """Final artifacts and run_stats.json (main process), then release memory cleanly."""
        if self.bar is not None:
            self.bar.close()
        acc = self.accelerator
        if acc.is_main_process:  # the manifest (inside write_artifacts) goes last: its presence means complete
            with self._disk_errors():
                extra = self.stats(self.step) if self.stats else {}
                stats = {**self.timer.stats(), "losses": self.losses, **extra}
                artifacts.atomic_write_json(self.out / "run_stats.json", stats)
                self.write_artifacts(self.out)
        # Freeing before end_training avoids a rare gloo abort at exit of multi-process runs (free_memory collects
        # the garbage itself: a second gc.collect() costs a quarter second and frees nothing).
        self.optimizer = self.params = self.trainables = None
        acc.free_memory()
        acc.end_training()
        outdir.release_lock(self.out)


def _last(out: Path) -> str:
    kept = checkpoint.list_checkpoints(out)
    return str(kept[-1]) if kept else "none"
