"""Benchmark of the stage-1 step (not a test): ms/step and peak memory vs contrastive batch and --text_chunk_size.

The full-size SD1.5 text encoder (CLIP ViT-L/14 text: hidden 768, 12 layers, 12 heads, intermediate 3072, 77
positions) with random weights, two 2-vector concepts, captions drawn from the built-in templates, frozen image
features (random, as the image tower is frozen and computed once), and the real train_clif.py step:
clif.contrastive.text_side + gradcache + losses, AdamW on the token rows. Each configuration runs in a fresh
process so its peak memory is its own. GPU when present, else CPU.

    python -m bench.clif_text_batch [--configs 32:0,512:0,512:128,2048:256] [--steps 2]   # batch:chunk (0 = one pass)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(batch: int, chunk: int, steps: int, warmup: int) -> dict:
    """Time `steps` stage-1 steps (after `warmup` untimed ones) at this batch and chunk size."""
    import resource

    import torch
    from benchmark import sd15_text_config
    from transformers import CLIPTextModel

    from clif.concepts import Concept
    from clif.contrastive.captions import Templates
    from clif.contrastive.gradcache import cached_backward
    from clif.contrastive.losses import clip_loss
    from clif.contrastive.paired import PairedCLIP
    from clif.contrastive.text_side import TextSide
    from clif.fixtures.tiny import clip_tokenizer
    from clif.tokens import add_placeholder_tokens, initializer_rows, install

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    enc = CLIPTextModel(sd15_text_config()).to(device).eval().requires_grad_(False)
    tok = clip_tokenizer()
    concepts = [Concept(n, f"<{n}>", w, w, []) for n, w in (("joe", "man"), ("wukong", "monkey"))]
    first = len(tok)
    add_placeholder_tokens([tok], concepts)
    enc.resize_token_embeddings(first)
    (module,) = install([enc], [[initializer_rows(tok, enc, c) for c in concepts]], first)

    class Model:  # the part of clif.models.DiffusionModel that TextSide uses
        tokenizers, text_encoders = [tok], [enc]

        @staticmethod
        def tokenize(prompts):
            return [tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids]

    class Paired(PairedCLIP):  # the projection and temperature of a paired CLIP, without its towers
        def __init__(self):
            self.model = torch.nn.Module()
            self.model.text_projection = torch.nn.Linear(768, 768, bias=False).to(device).requires_grad_(False)
            self.model.logit_scale = torch.nn.Parameter(torch.tensor(4.6052, device=device), requires_grad=False)
            self.model.dtype = torch.float32

    paired = Paired()
    text = TextSide(Model(), [paired], concepts)
    rng, t = random.Random(0), Templates()
    subjects = ["<joe>", "<wukong>", "a man", "a monkey", "<joe>'s coat"]
    pairs = []
    for _ in range(4096):
        phrases = rng.sample(subjects, rng.choice((1, 2)))
        pairs.append((t.caption(phrases, rng), tuple(phrases)))
    image = torch.randn(len(pairs), 768, device=device)
    opt = torch.optim.AdamW([module.new], lr=1e-4, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        idx = torch.randint(len(pairs), (batch,), generator=gen)
        caps, keys = [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]

        def loss_of(feats, idx=idx, keys=keys):
            return clip_loss(feats[0], image[idx.to(device)], keys, paired.logit_scale)

        cached_backward(
            lambda s, caps=caps: text.features(caps[s]), batch, chunk or None, loss_of, torch.Tensor.backward
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {
        "batch": batch,
        "chunk": chunk or None,
        "device": str(device),
        "steps_timed": steps,
        "ms_per_step": 1000 * sum(times[warmup:]) / steps,
        "warmup_steps": warmup,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_build_mb": base_rss,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="32:0,512:0,512:128,2048:256", help="batch:chunk list (chunk 0 = one pass).")
    p.add_argument("--steps", type=int, default=2, help="Timed steps per configuration.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps before them (0: the first step is timed).")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    a = p.parse_args()
    if a.one:
        batch, chunk = (int(x) for x in a.one.split(":"))
        print(json.dumps(one(batch, chunk, a.steps, a.warmup)))
        return
    rows = []
    for cfg in a.configs.split(","):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.clif_text_batch",
                "--one",
                cfg,
                "--steps",
                str(a.steps),
                "--warmup",
                str(a.warmup),
            ],
            capture_output=True,
            cwd=REPO,
            text=True,
            check=False,
        )
        if r.returncode:
            print(f"{cfg}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| batch | chunk | device | ms/step | peak RSS MB | RSS after build MB | peak CUDA MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['chunk'] or 'one pass'} | {r['device']} | {r['ms_per_step']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_after_build_mb']:.0f} | {r.get('peak_cuda_mb', '–')} |"
        )


if __name__ == "__main__":
    main()
