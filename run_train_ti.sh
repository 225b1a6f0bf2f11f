#!/usr/bin/env bash
# Stage 2 of CLIF: multi-concept textual inversion.
#   MODEL  base model (hub id or local diffusers folder)   default: stabilityai/stable-diffusion-xl-base-1.0
#   DATA   concept set (dataset/README.md)                  required
#   OUT    output dir                                       default: outputs/ti
#   STAGE  optional stage-1 output to start from
#   RES    resolution                                       default: 1024 (use 512 for SD 1.x, 768 for SD 2.x)
#   LAUNCH extra `accelerate launch` flags (e.g. "--num_processes 2 --multi_gpu")
# Any further flags are passed to train_ti.py and override the ones below.
# Settings: 2 vectors per token, lr 5e-4 (diffusers' textual-inversion default; the paper gives no TI numbers),
# effective batch 4, 1500 steps, fp16 frozen weights, cached VAE latents.
set -euo pipefail
cd "$(dirname "$0")"
: "${DATA:?set DATA to a concept set folder (see dataset/README.md)}"
MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
OUT=${OUT:-outputs/ti}
RES=${RES:-1024}
exec accelerate launch ${LAUNCH:-} train_ti.py \
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --output_dir "$OUT" \
  ${STAGE:+--stage_dir "$STAGE"} \
  --resolution "$RES" --num_vectors 2 --train_batch_size 1 --gradient_accumulation_steps 4 \
  --learning_rate 5e-4 --lr_scheduler constant --max_train_steps 1500 \
  --mixed_precision fp16 --cache_latents --random_flip \
  --checkpointing_steps 500 --checkpoints_total_limit 2 --validation_steps 250 \
  "$@"
