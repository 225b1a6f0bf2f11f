"""Every random stream of a run, by name, and how each is derived from `--seed`.

A run draws from these streams and from nothing else; the same `--seed` gives the same result, and a resumed
run continues the streams from the checkpoint (`rng.safetensors` holds the generators marked "saved").

stream         seed                       drives                                                      where
data_order     seed, per epoch element()  stages 2-3, epoch e: the images filling the                 train/data.py
                                          concepts' shares (--concept_balance), their order,
                                          flips and caption templates
noise          seed                       stages 2-3: latent sample, noise, offset, timesteps;        train/training.py
                                          stage 1: the pair order of every batch (saved)
dropout        seed                       torch's global generator: LoRA dropout (saved)              train/stage.py
lora_init      seed                       down-weights of every new LoRA (stage-1 text, stage 3)      lora.py
augmentation   seed                       stage 1: held-out photos, regions, kinds, pieces            contrastive/
                                          (--concept_balance), crops, captions                        augment.py
probe          seed + 10000               stage 1: views of the before/after confusion probe          contrastive/
                                                                                                        confusion.py
prior_data     seed + 1, per sample       stage 3: class-image flip and caption template              train/prior.py
prior_noise    seed + 1                   stage 3: noise and timesteps of the class-image loss (saved) train/prior.py
segmix         seed + 20000, per collage  stage 3 --segmix_prob: partner, sides, scales, places and    train/segmix.py
                element()                 mirroring of collage i of the pool
segmix_order   seed + 20001, per epoch    stage 3 --segmix_prob: which samples of epoch e are          train/segmix.py
                element()                 collages, and which of their image's collages
validation     seed, image i: + i         validation images                                           images.py
generated      seed, image i: + i         generated class images and common-concept images            images.py

`--seed` is below 2**63 (cli.seed_type), so every derived seed fits a torch generator (64 bits).
"""

from __future__ import annotations

# stream -> offset added to --seed
STREAMS: dict[str, int] = {
    "data_order": 0,
    "noise": 0,
    "dropout": 0,
    "lora_init": 0,
    "augmentation": 0,
    "probe": 10_000,
    "prior_data": 1,
    "prior_noise": 1,
    "segmix": 20_000,
    "segmix_order": 20_001,
    "validation": 0,
    "generated": 0,
}


def stream(seed: int, name: str) -> int:
    """The seed of stream `name` of a run started with `--seed seed`."""
    return seed + STREAMS[name]


def element(stream_seed: int, e: int) -> int:
    """The seed of the generator of sample `e` of a per-sample stream (data_order, prior_data): a pure function
    of (seed, e), so micro-batch k is the same after a resume and on any number of processes."""
    return (stream_seed * 1_000_003 + e) % 2**64
