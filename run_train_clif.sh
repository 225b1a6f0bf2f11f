#!/usr/bin/env bash
# Stage 1 of CLIF: contrastive fine-tuning of the concept tokens (Global / Region / Mix pairs).
#   MODEL  base model (hub id or local diffusers folder)   default: stabilityai/stable-diffusion-xl-base-1.0
#   DATA   concept set (dataset/README.md)                  required
#   OUT    output dir                                       default: outputs/clif
#   COMMON comma list of common concepts for negatives      default: man,woman,dog,cat,car,chair
#   LAUNCH extra `accelerate launch` flags (e.g. "--num_processes 2 --multi_gpu")
# Any further flags are passed to train_clif.py and override the ones below. The paired CLIP models default to
# openai/clip-vit-large-patch14 (+ laion/CLIP-ViT-bigG-14-laion2B-39B-b160k for SDXL's second encoder).
# Source of each setting: "official code" = the authors' scripts/run_train_clif.sh (clif-official/clif_code);
# "ours" = our choice, not measured; "measured" = README.md, "Performance".
set -euo pipefail
cd "$(dirname "$0")"
: "${DATA:?set DATA to a concept set folder (see dataset/README.md)}"
MODEL=${MODEL:-stabilityai/stable-diffusion-xl-base-1.0}
OUT=${OUT:-outputs/clif}
COMMON=${COMMON-man,woman,dog,cat,car,chair}  # set COMMON="" for none
args=(
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --output_dir "$OUT"
  --common_words "$COMMON"        # ours
  --num_common_images 4           # ours
  --num_pairs 4096                # ours: twice the batch, so a batch is not mostly repeats
  --global_ratio 0.4 --region_ratio 0.2 --mix_ratio 0.4  # ours (not measured)
  --region_segments 8 --min_region_area 0.05 --regions_per_image 4  # ours: see clif/contrastive/regions.py
  --holdout_images 1              # ours: >= 1 photo per concept held out for the confusion matrix
  --num_vectors 2                 # official code: two tokens per concept (<joe1> <joe2>)
  --train_batch_size 2048         # official code: 128 per GPU x 8 GPUs x 2 accumulation = 2048, here on one GPU
  --gradient_accumulation_steps 1 #   through gradient caching (next line) instead of 8 GPUs
  --text_chunk_size 256           # ours: text-encoder memory of 256 captions per pass (CPU numbers: README.md, "Performance")
  --learning_rate 1e-4            # official code
  --lr_scheduler constant         # official code
  --adam_weight_decay 1e-2        # our reading of the official code
  --max_train_steps 500           # ours (not measured; the official code runs 200 epochs of its pair set)
  --mixed_precision fp16          # official code
  --checkpointing_steps 250 --checkpoints_total_limit 2  # ours
)
# 8-bit AdamW: on by default when bitsandbytes is installed and CUDA is present (official code: --use_8bit_adam)
exec accelerate launch ${LAUNCH:-} train_clif.py "${args[@]}" "$@"
