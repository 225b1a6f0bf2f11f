#!/usr/bin/env bash
# Stage 3 of CLIF: LoRA on the UNet attention layers, trained jointly with the concept embeddings.
#   MODEL  base model (hub id or local diffusers folder)   default: stabilityai/stable-diffusion-xl-base-1.0
#   DATA   concept set (dataset/README.md)                  required
#   STAGE  stage-2 output (train_ti.py)                     required
#   OUT    output dir                                       default: outputs/lora
#   RES    resolution                                       default: 1024 (use 512 for SD 1.x, 768 for SD 2.x)
#   LAUNCH extra `accelerate launch` flags (e.g. "--num_processes 2 --multi_gpu")
# Any further flags are passed to train_lora.py and override the ones below; for long runs add --torch_compile
# (compiles the UNet step once; README, Performance, says from how many steps it pays).
# Source of each setting: "official code" = the authors' scripts/run_train_lora.sh (clif-official/clif_code);
# "ours" = our choice, not measured; "measured" = docs/library_notes.md.
set -euo pipefail
cd "$(dirname "$0")"
: "${DATA:?set DATA to a concept set folder (see dataset/README.md)}"
: "${STAGE:?set STAGE to the stage-2 output dir}"
MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
OUT=${OUT:-outputs/lora}
RES=${RES:-1024}
args=(
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --stage_dir "$STAGE" --output_dir "$OUT"
  --resolution "$RES"             # official code: 1024 (SDXL)
  --rank 16                       # official code
  --lora_alpha 16                 # our reading of the official code: alpha = rank
  --lora_targets to_q,to_k,to_v,to_out.0  # official code: all attention projections
  --learning_rate 2e-4            # official code
  --embedding_learning_rate 2e-4  # our reading of the official code: embeddings at the LoRA lr
  --train_batch_size 4            # ours: effective 64 (the official code has 5 per GPU x 2 x 8 GPUs = 80);
  --gradient_accumulation_steps 16  # here 4 x 16 = 64 on one GPU (divide by the number of GPUs)
  --gradient_checkpointing        # official code
  --lr_scheduler constant         # official code
  --max_train_steps 1000          # ours (not measured; the official code runs 600 epochs)
  --mixed_precision fp16          # official code
  --cache_latents                 # measured: 9.3-9.7 s -> 6.6-6.8 s per LoRA step (CPU, docs/library_notes.md)
  --random_flip --export_kohya    # ours
  --checkpointing_steps 250 --checkpoints_total_limit 2 --validation_steps 250  # ours
)
exec accelerate launch ${LAUNCH:-} train_lora.py "${args[@]}" "$@"
