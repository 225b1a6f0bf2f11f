#!/usr/bin/env bash
# The embedded default, offline on CPU in a few minutes: tiny SD1.5-architecture model (+ tiny CLIPSeg and
# open_clip) and a generated 2-concept set -> stage 1 -> stage 2 -> stage 3 (through the run_train_*.sh
# scripts) -> inference on the evaluation prompt sets -> evaluate.py. Everything lands in outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
D=outputs/demo
rm -rf "$D" && mkdir -p "$D"
python -m clif.fixtures.tiny --family sd15 --out "$D/tiny-sd15"
python -m clif.fixtures.tiny --family clipseg --out "$D/tiny-clipseg"
python -m clif.fixtures.tiny --family openclip --out "$D/tiny-openclip"
python -m clif.fixtures.synthetic --out "$D/concepts" --num_concepts 2 --num_images 4
export MODEL="$D/tiny-sd15" DATA="$D/concepts" RES=64 LAUNCH="--num_processes 1 --num_machines 1 --dynamo_backend no"
CPU="--mixed_precision no --gradient_accumulation_steps 1"
OUT="$D/s1-clif" COMMON="" bash run_train_clif.sh $CPU --segmenter "$D/tiny-clipseg" --cache_dir "$D/cache" \
  --num_pairs 200 --train_batch_size 32 --max_train_steps 200 --learning_rate 5e-2 --global_ratio 0.7 --mix_ratio 0.3
OUT="$D/s2-ti" STAGE="$D/s1-clif" bash run_train_ti.sh $CPU --max_train_steps 40 --learning_rate 5e-3 \
  --train_batch_size 2 --checkpointing_steps 20 --validation_steps 20 --num_validation_images 2 \
  --validation_inference_steps 10 --validation_prompt "a photo of a <redball> next to a <bluebox>"
OUT="$D/s3-lora" STAGE="$D/s2-ti" bash run_train_lora.sh $CPU --max_train_steps 40 --learning_rate 1e-3 \
  --train_batch_size 2 --checkpointing_steps 20 --validation_steps 20 --num_validation_images 2 \
  --validation_inference_steps 10 --validation_prompt "a photo of a <redball> next to a <bluebox>"
for set in single pair; do
  python inference.py --pretrained_model_name_or_path "$MODEL" --stage_dir "$D/s3-lora" --prompt_set $set \
    --num_images_per_prompt 2 --num_inference_steps 10 --output_dir "$D/images-$set"
done
python evaluate.py --images "$D/images-single" "$D/images-pair" --labels single pair --concepts "$D/concepts" \
  --clip_model "local-dir:$D/tiny-openclip" --detector none --output_dir "$D/eval"
echo "demo done: $D/s1-clif/confusion.png, $D/s{2,3}-*/ (embeddings, LoRA, checkpoints, validation/, logs/),"
echo "           $D/images-*/contact_sheet.png, $D/eval/metrics.{md,csv,json,png}"
