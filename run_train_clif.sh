#!/usr/bin/env bash
# Stage 1 of CLIF: contrastive fine-tuning of the concept tokens (Global / Region / Mix pairs).
#   MODEL  base model (hub id or local diffusers folder)   default: stabilityai/stable-diffusion-xl-base-1.0
#   DATA   concept set (dataset/README.md)                  required
#   OUT    output dir                                       default: outputs/clif
#   COMMON comma list of common concepts for negatives      default: man,woman,dog,cat,car,chair
#   LAUNCH extra `accelerate launch` flags (e.g. "--num_processes 2 --multi_gpu")
# Any further flags are passed to train_clif.py and override the ones below. The paired CLIP models default to
# openai/clip-vit-large-patch14 (+ laion/CLIP-ViT-bigG-14-laion2B-39B-b160k for SDXL's second encoder).
set -euo pipefail
cd "$(dirname "$0")"
: "${DATA:?set DATA to a concept set folder (see dataset/README.md)}"
MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
OUT=${OUT:-outputs/clif}
COMMON=${COMMON:-man,woman,dog,cat,car,chair}
exec accelerate launch ${LAUNCH:-} train_clif.py \
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --output_dir "$OUT" \
  --common_words "$COMMON" --num_common_images 4 --num_pairs 2000 \
  --global_ratio 0.4 --region_ratio 0.2 --mix_ratio 0.4 --num_vectors 2 \
  --train_batch_size 32 --learning_rate 1e-3 --max_train_steps 500 --mixed_precision fp16 \
  --checkpointing_steps 250 --checkpoints_total_limit 2 \
  "$@"
