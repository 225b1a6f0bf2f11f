"""What happens around each optimizer step of a training stage: sync, clip, step, log, checkpoint, validate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clif import seeds
from clif.errors import RunFailed
from clif.images import render_validation
from clif.outputs import artifacts, checkpoint, outdir
from clif.train import training


class StepRunner:
    """Owns the optimizer, schedule, checkpoints and validation of one run; the script owns the loss."""

    def __init__(
        self,
        args,
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
    ):
        self.args, self.accelerator, self.model = args, accelerator, model
        self.params, self.optimizer, self.lr_scheduler, self.noise = params, optimizer, lr_scheduler, noise
        self.trainables, self.write_artifacts, self.max_steps = trainables, write_artifacts, max_steps
        self.generators = [noise.gen] + [n.gen for n in extra_noise]  # all saved in checkpoints
        self.out = Path(args.output_dir)
        self.step = 0
        self.timer = training.StepTimer(accelerator.device)
        self.desc = desc
        self.bar = None
        self.losses: list[float] = []  # per optimizer step (global mean), kept in run_stats.json

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
        accum = self.args.gradient_accumulation_steps
        return range(self.step * accum, (self.step + 1) * accum)

    @property
    def done(self) -> bool:
        return self.step >= self.max_steps

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.args.gradient_accumulation_steps)

    def finish(self, loss: torch.Tensor, extra_logs: dict | None = None) -> None:
        """Optimizer step after the micro-batches; `loss` is their mean (for logging)."""
        acc, args = self.accelerator, self.args
        training.all_reduce_grads(self.params, acc)
        grad_norm = acc.clip_grad_norm_(self.params, args.max_grad_norm)
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
        if acc.is_main_process and (self.step % args.checkpointing_steps == 0 or last):
            with self._disk_errors():
                checkpoint.save_checkpoint(
                    self.out,
                    self.step,
                    self.trainables,
                    self.optimizer,
                    self.lr_scheduler,
                    acc.scaler,
                    self.generators,
                    limit=args.checkpoints_total_limit,
                    write_artifacts=self.write_artifacts,
                )
        if acc.is_main_process and args.validation_prompt and (self.step % args.validation_steps == 0 or last):
            render_validation(
                self.model,
                args.validation_prompt,
                num_images=args.num_validation_images,
                seed=seeds.stream(args.seed, "validation"),
                steps=args.validation_inference_steps,
                resolution=args.resolution,
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
        import gc

        if self.bar is not None:
            self.bar.close()
        acc = self.accelerator
        if acc.is_main_process:  # the manifest (inside write_artifacts) goes last: its presence means complete
            with self._disk_errors():
                artifacts.atomic_write_json(self.out / "run_stats.json", {**self.timer.stats(), "losses": self.losses})
                self.write_artifacts(self.out)
        # Freeing before end_training avoids a rare gloo abort at exit of multi-process runs.
        self.optimizer = self.params = self.trainables = None
        acc.free_memory()
        gc.collect()
        acc.end_training()
        outdir.release_lock(self.out)


def _last(out: Path) -> str:
    kept = checkpoint.list_checkpoints(out)
    return str(kept[-1]) if kept else "none"
