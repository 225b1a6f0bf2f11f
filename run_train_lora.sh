#!/usr/bin/env bash
# Stage 3 of CLIF: LoRA on the UNet attention layers, trained jointly with the concept embeddings.
#   MODEL  base model (hub id or local diffusers folder)   default: stabilityai/stable-diffusion-xl-base-1.0
#   DATA   concept set (dataset/README.md)                  required
#   STAGE  stage-2 output (train_ti.py)                     required
#   OUT    output dir                                       default: outputs/lora
#   RES    resolution                                       default: 1024 (use 512 for SD 1.x, 768 for SD 2.x)
#   LAUNCH extra `accelerate launch` flags (e.g. "--num_processes 2 --multi_gpu")
# Any further flags are passed to train_lora.py and override the ones below.
# Paper settings: rank 16 on all attention projections (to_q, to_k, to_v, to_out.0), lr 2e-4.
set -euo pipefail
cd "$(dirname "$0")"
: "${DATA:?set DATA to a concept set folder (see dataset/README.md)}"
: "${STAGE:?set STAGE to the stage-2 output dir}"
MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
OUT=${OUT:-outputs/lora}
RES=${RES:-1024}
exec accelerate launch ${LAUNCH:-} train_lora.py \
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --stage_dir "$STAGE" --output_dir "$OUT" \
  --resolution "$RES" --rank 16 --lora_targets to_q,to_k,to_v,to_out.0 --learning_rate 2e-4 \
  --embedding_learning_rate 5e-5 --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 1000 \
  --lr_scheduler constant --mixed_precision fp16 --cache_latents --random_flip --export_kohya \
  --checkpointing_steps 250 --checkpoints_total_limit 2 --validation_steps 250 \
  "$@"
