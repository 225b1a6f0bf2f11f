#!/usr/bin/env bash
# The embedded default, offline on CPU:
#   bash scripts/demo.sh         the toy world: its pretrained base (pretrained/toyworld/model) learns two concepts,
#                                a red ball and a blue box (stage 1 -> 2 -> 3 through the run_train_*.sh scripts),
#                                draws them alone and together (inference.py), evaluate.py scores the images with
#                                the world's CLIP and the world's referee reads them; a five-line summary read from
#                                what it wrote. Everything lands in outputs/demo/ (timings.txt: seconds per part).
#   bash scripts/demo.sh --tiny  every path on tiny random models (its images and metrics are noise): outputs/demo-tiny/
# Environment: CLIF_STEPS, TI_STEPS, LORA_STEPS (training steps of stages 1, 2, 3; default 100 each, where the
# toy-world experiment trains 200, 300, 200), IMAGES (per prompt, default 4), INFERENCE_STEPS (default 20),
# DEMO_OUT (folder), SETUP=0 (skip scripts/setup.sh: python and accelerate already on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "" | --tiny) ;;
  *) echo "usage: bash scripts/demo.sh [--tiny]" >&2; exit 2 ;;
esac
if [ "${SETUP:-1}" != 0 ]; then
  bash scripts/setup.sh
  source .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LAUNCH="--num_processes 1 --num_machines 1 --dynamo_backend no"
CPU="--mixed_precision no --gradient_accumulation_steps 1"

if [ "${1:-}" = --tiny ]; then
  D=${DEMO_OUT:-outputs/demo-tiny}
  rm -rf "$D" && mkdir -p "$D"
  python -m clif.fixtures.tiny --family sd15 --out "$D/tiny-sd15"
  python -m clif.fixtures.tiny --family clipseg --out "$D/tiny-clipseg"
  python -m clif.fixtures.tiny --family openclip --out "$D/tiny-openclip"
  python -m clif.fixtures.synthetic --out "$D/concepts" --num_concepts 2 --num_images 4
  export MODEL="$D/tiny-sd15" DATA="$D/concepts" RES=64
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
  exit 0
fi

D=${DEMO_OUT:-outputs/demo}
B=pretrained/toyworld/model  # the toy world's base: 32 px, its own CLIP (paired_clip/ for stage 1 and evaluate.py)
rm -rf "$D" && mkdir -p "$D"
part() {  # run a part of the demo; its seconds (wall, user and system CPU) go to timings.txt
  local TIMEFORMAT="$1 %R wall %U user %S sys"
  shift
  { time "$@" 2>&3; } 3>&2 2>>"$D/timings.txt"
}
# the ladder's 'distinct' rung: <ball_a> a red ball, <box_b> a blue box; images, masks, other balls and boxes
# (stage 1's common-concept negatives) and the prompt templates the referee can score
part concepts python -m clif.toyworld concepts --rung distinct --out "$D/concepts"
export MODEL=$B DATA="$D/concepts" RES=32
# the toy-world experiment's learning rates, batches and LoRA rank on this base (clif/toyworld/methods.py), at the
# demo's step counts; the run_train_*.sh scripts add their own settings (random flips, checkpoints, ...)
part stage1 env OUT="$D/s1-clif" COMMON=ball,box bash run_train_clif.sh $CPU --seed 0 --clip_model "$B/paired_clip" \
  --cache_dir "$D/cache" --num_pairs 600 --train_batch_size 64 --learning_rate 5e-3 --adam_weight_decay 0 \
  --max_train_steps "${CLIF_STEPS:-100}"
part stage2 env OUT="$D/s2-ti" STAGE="$D/s1-clif" bash run_train_ti.sh $CPU --seed 0 --train_batch_size 4 \
  --learning_rate 5e-3 --max_train_steps "${TI_STEPS:-100}"
part stage3 env OUT="$D/s3-lora" STAGE="$D/s2-ti" bash run_train_lora.sh $CPU --seed 0 --train_batch_size 4 \
  --rank 8 --lora_alpha 8 --learning_rate 1e-3 --embedding_learning_rate 1e-3 --max_train_steps "${LORA_STEPS:-100}"
for set in single pair; do  # inference.py's own defaults but for the image count, steps and guidance
  part "images-$set" python inference.py --pretrained_model_name_or_path "$B" --stage_dir "$D/s3-lora" \
    --prompt_set "$D/concepts/prompts_$set.txt" --num_images_per_prompt "${IMAGES:-4}" \
    --num_inference_steps "${INFERENCE_STEPS:-20}" --guidance_scale 4 --batch_size 16 --output_dir "$D/images-$set"
done
part evaluate python evaluate.py --images "$D/images-single" "$D/images-pair" --labels single pair \
  --concepts "$D/concepts" --clip_model "$B/paired_clip" --detector none --output_dir "$D/eval"
part referee python -m clif.toyworld referee --images "$D/images-single" "$D/images-pair" --concepts "$D/concepts" \
  --out "$D/referee.json"
echo
python -m clif.toyworld summary "$D"
