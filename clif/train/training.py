"""Mechanics shared by the diffusion training stages: accelerator, precision, optimizer, noise, the loss step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clif.errors import UserError
from clif.models import DiffusionModel
from clif.train.data import LatentCache, Sample
from clif.train.segmix import latent_mask


def make_accelerator(args, output_dir: str):
    """An Accelerator logging to <output_dir>/logs; gradient accumulation is done by the loop itself."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report = None if args.report_to == "none" else args.report_to
    return Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=report,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=f"{output_dir}/logs"),
    )


def frozen_dtype(accelerator) -> torch.dtype:
    """Precision of the frozen weights: half on GPU under mixed precision, fp32 otherwise."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place_frozen(model: DiffusionModel, device, dtype: torch.dtype, *, gradient_checkpointing: bool) -> None:
    """Move the frozen modules to `device` in `dtype`, with SDPA attention (the diffusers default in torch 2)."""
    # SDXL's VAE overflows in fp16 (config force_upcast): keep it in fp32.
    vae_dtype = torch.float32 if getattr(model.vae.config, "force_upcast", False) else dtype
    for module, dt in [(model.unet, dtype), (model.vae, vae_dtype), *[(e, dtype) for e in model.text_encoders]]:
        module.to(device)
        if dt != torch.float32:  # .to(fp32) of an fp32 model only triggers a diffusers warning
            module.to(dt)
    if gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for enc in model.text_encoders:
            # transformers 5 renamed it; keep working on both
            getattr(enc, "activation_checkpointing_enable", enc.gradient_checkpointing_enable)()
            enc.train()  # transformers only checkpoints in train mode; CLIP has no dropout


def check_optimizer_flags(args) -> None:
    """Fail early and clearly when --use_8bit_adam cannot work."""
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)") from None


def want_8bit_adam(flag: bool | None) -> bool:
    """--use_8bit_adam as given, or (unset) whether bitsandbytes is installed and CUDA present (official code)."""
    if flag is not None:
        return flag
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def make_optimizer(
    param_groups: list[dict], *, eight_bit: bool, betas: tuple[float, float], weight_decay: float, eps: float
) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit one with `eight_bit`; the fused kernel when every parameter is on CUDA)."""
    kwargs = {"betas": betas, "weight_decay": weight_decay, "eps": eps}
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    if all(p.is_cuda for g in param_groups for p in g["params"]):
        # one fused kernel instead of per-tensor launches (many small LoRA tensors)
        return torch.optim.AdamW(param_groups, **kwargs, fused=True)
    return torch.optim.AdamW(param_groups, **kwargs)


def make_lr_scheduler(optimizer, *, name: str, warmup_steps: int, max_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def resolve_steps(
    *, max_train_steps: int | None, num_train_epochs: int | None, samples_per_step: int, num_samples: int, default: int
) -> int:
    """Optimizer steps of the run: --max_train_steps, else --num_train_epochs over `num_samples`, else `default`."""
    if max_train_steps:
        return max_train_steps
    if num_train_epochs:
        return max(1, math.ceil(num_train_epochs * num_samples / samples_per_step))
    return default


def scaled_lr(lr: float, args, num_processes: int) -> float:
    return lr * args.train_batch_size * args.gradient_accumulation_steps * num_processes if args.scale_lr else lr


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    w = torch.clamp(snr, max=gamma) / snr
    return w * snr / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else w


class NoiseSource:
    """All per-step random draws, from one generator on the training device.

    Draws are made for the whole global batch and sliced per process, so N processes see exactly the
    numbers one process would with the same global batch. The state is saved in checkpoints.
    """

    def __init__(self, seed: int, device, global_batch: int, rank: int, local_batch: int):
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device, self.global_batch = device, global_batch
        self.sl = slice(rank * local_batch, (rank + 1) * local_batch)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn((self.global_batch, *shape), generator=self.gen, device=self.device)[self.sl]

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.global_batch,), generator=self.gen, device=self.device)[self.sl]


class TextCache:
    """UNet conditioning per caption, computed once, for runs where nothing on the text side trains."""

    def __init__(self, model: DiffusionModel):
        self.model, self.store = model, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        for c in captions:
            if c not in self.store:
                hidden, pooled = self.model.encode_prompt(self.model.tokenize([c]))
                self.store[c] = (hidden[0], None if pooled is None else pooled[0])
        hidden = torch.stack([self.store[c][0] for c in captions])
        pooled = None if self.store[captions[0]][1] is None else torch.stack([self.store[c][1] for c in captions])
        return hidden, pooled


def diffusion_loss(
    model: DiffusionModel,
    sample: Sample,
    cache: LatentCache | None,
    noise: NoiseSource,
    *,
    dtype: torch.dtype,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    text_cache: TextCache | None = None,
    unet=None,
) -> torch.Tensor:
    """The denoising loss of one micro-batch (epsilon or v target from the scheduler config). `unet`: what to call
    for the prediction (the compiled forward with --torch_compile); the model's UNet by default."""
    device = noise.device
    if cache is not None:
        mean, std = cache.posterior(sample)
    else:
        with torch.no_grad():
            dist = model.vae.encode(sample.pixels.to(device, model.vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    latents = (mean + std * noise.randn(*mean.shape[1:])) * model.vae_scale
    eps = noise.randn(*latents.shape[1:])
    if noise_offset:
        eps = eps + noise_offset * noise.randn(latents.shape[1], 1, 1)
    sched = model.noise_scheduler
    t = noise.randint(sched.config.num_train_timesteps)
    noisy = sched.add_noise(latents, eps, t)
    target = eps if model.prediction_type == "epsilon" else sched.get_velocity(latents, eps, t)
    if text_cache is not None:
        hidden, pooled = text_cache(sample.captions)
    else:
        hidden, pooled = model.encode_prompt(model.tokenize(sample.captions))
    unet = model.unet if unet is None else unet
    pred = unet(noisy.to(dtype), t, hidden.to(dtype), **model.unet_kwargs(pooled, sample.time_ids)).sample
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if sample.loss_mask is not None:  # Seg-Mix: only the pasted subjects count (mean over every element, as MuDI)
        error = error * latent_mask(sample.loss_mask, error.shape[-2:]).to(error.device)
    loss = error.mean(dim=(1, 2, 3))
    if snr_gamma:
        loss = loss * snr_weights(sched, t, snr_gamma)
    return loss.mean()


def micro_batch_loss(
    model: DiffusionModel, data, cache: LatentCache | None, noise: NoiseSource, shard, k: int, **loss_kwargs
) -> torch.Tensor:
    """The denoising loss of micro-batch `k` of the sample stream `data` (this process's slice of it)."""
    sample = data.micro_batch(k, shard.global_batch, shard.rank, shard.local, with_pixels=cache is None)
    return diffusion_loss(model, sample, cache, noise, **loss_kwargs)


def all_reduce_grads(params: list[torch.Tensor], accelerator) -> None:
    """Average gradients over processes in one flat all-reduce (no DDP wrapper needed for a few rows or LoRA)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    flat = accelerator.reduce(flat, "mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


class StepTimer:
    """Wall time of optimizer steps (checkpoint/validation excluded) and peak memory, for run_stats.json."""

    def __init__(self, device):
        import time

        self.device, self.clock, self.times, self._t = device, time.perf_counter, [], None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t = self.clock()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(self.clock() - self._t)

    def stats(self) -> dict:
        import resource
        import statistics

        steady = self.times[1:] or self.times  # the first step pays for warm-up
        out = {
            "first_step_ms": 1000 * self.times[0] if self.times else None,  # warm-up, and the compile if any
            "steps_timed": len(steady),
            "median_step_ms": 1000 * statistics.median(steady) if steady else None,
            "mean_step_ms": 1000 * statistics.fmean(steady) if steady else None,
            "device": str(self.device),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if self.device.type == "cuda":
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out
