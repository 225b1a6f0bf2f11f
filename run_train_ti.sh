#!/usr/bin/env bash
# Stage 2 of CLIF: multi-concept textual inversion.
#   MODEL  base model (hub id or local diffusers folder)   default: stabilityai/stable-diffusion-xl-base-1.0
#   DATA   concept set (dataset/README.md)                  required
#   OUT    output dir                                       default: outputs/ti
#   STAGE  optional stage-1 output to start from
#   RES    resolution                                       default: 1024 (use 512 for SD 1.x, 768 for SD 2.x)
#   LAUNCH extra `accelerate launch` flags (e.g. "--num_processes 2 --multi_gpu")
# Any further flags are passed to train_ti.py and override the ones below; for long runs add --torch_compile
# (compiles the UNet step once; README, Performance, says from how many steps it pays).
# Source of each setting: "official code" = the authors' scripts/run_train_ti.sh (clif-official/clif_code);
# "ours" = our choice, not measured; "measured" = docs/library_notes.md.
set -euo pipefail
cd "$(dirname "$0")"
: "${DATA:?set DATA to a concept set folder (see dataset/README.md)}"
MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
OUT=${OUT:-outputs/ti}
RES=${RES:-1024}
args=(
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --output_dir "$OUT"
  ${STAGE:+--stage_dir "$STAGE"}
  --resolution "$RES"             # official code: 1024 (SDXL)
  --num_vectors 2                 # official code: two tokens per concept
  --train_batch_size 4            # official code: 4 per GPU x 2 accumulation x 8 GPUs = 64;
  --gradient_accumulation_steps 16  # here 4 x 16 = 64 on one GPU (divide by the number of GPUs)
  --gradient_checkpointing        # official code
  --learning_rate 2e-4            # official code
  --lr_scheduler constant         # official code
  --max_train_steps 500           # ours (not measured; the official code runs 200 epochs)
  --mixed_precision fp16          # official code
  --cache_latents                 # measured: caching latents cut a LoRA step 9.3-9.7 s -> 6.6-6.8 s (CPU, docs/library_notes.md)
  --random_flip                   # ours
  --checkpointing_steps 250 --checkpoints_total_limit 2 --validation_steps 250  # ours
)
exec accelerate launch ${LAUNCH:-} train_ti.py "${args[@]}" "$@"
