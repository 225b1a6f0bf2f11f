#!/usr/bin/env bash
# The embedded default, offline on CPU in a few minutes: tiny SD1.5-architecture model + generated concept set
# -> stage 2 (textual inversion, via run_train_ti.sh) -> inference. Results in outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
D=outputs/demo
rm -rf "$D" && mkdir -p "$D"
python -m clif.tiny --family sd15 --out "$D/tiny-sd15"
python -m clif.synthetic --out "$D/concepts" --num_concepts 2 --num_images 4
MODEL="$D/tiny-sd15" DATA="$D/concepts" OUT="$D/ti" RES=64 LAUNCH="--num_processes 1 --num_machines 1 --dynamo_backend no" \
  bash run_train_ti.sh --mixed_precision no --max_train_steps 60 --learning_rate 5e-3 --gradient_accumulation_steps 1 \
  --train_batch_size 2 --checkpointing_steps 30 --validation_steps 30 --num_validation_images 2 \
  --validation_inference_steps 10 --validation_prompt "a photo of a <redball> next to a <bluebox>"
python inference.py --pretrained_model_name_or_path "$D/tiny-sd15" --stage_dir "$D/ti" \
  --prompt "a photo of a <redball>" --prompt "a <redball> next to a <bluebox>" \
  --num_images_per_prompt 4 --num_inference_steps 20 --output_dir "$D/images"
echo "demo done: $D/ti (embeddings, checkpoints, validation/, logs/) and $D/images/contact_sheet.png"
