#!/usr/bin/env bash
# GPU check (run on a CUDA machine from the repo root, wheels for missing packages in .whl/):
# fp16 mixed-precision smoke runs of every stage on the tiny models (validation mid-run, resume), then the
# benchmark on the tiny model and the full SD1.5 architecture (random weights) at 256 px.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
T=/tmp/dc; rm -rf $T; mkdir -p $T
python3 -m clif.fixtures.synthetic --out $T/data --num_concepts 2 --num_images 3 >/dev/null
python3 -m clif.fixtures.tiny --family clipseg --out $T/seg >/dev/null
ok=1
for fam in sd15 sdxl; do
  python3 -m clif.fixtures.tiny --family $fam --out $T/$fam >/dev/null
  common="--pretrained_model_name_or_path $T/$fam --train_data_dir $T/data --report_to tensorboard --mixed_precision fp16"
  val="--resolution 64 --validation_prompt a_<redball> --validation_steps 2 --validation_inference_steps 2 --num_validation_images 1"
  python3 train_clif.py $common --output_dir $T/$fam-s1 --segmenter $T/seg --cache_dir $T/cache --num_pairs 64 --train_batch_size 16 --max_train_steps 4 2>&1 | tail -2 || ok=0
  python3 train_ti.py $common --output_dir $T/$fam-s2 --stage_dir $T/$fam-s1 $val --max_train_steps 4 --checkpointing_steps 2 --cache_latents --gradient_accumulation_steps 1 2>&1 | tail -1 || ok=0
  python3 train_lora.py $common --output_dir $T/$fam-s3 --stage_dir $T/$fam-s2 $val --max_train_steps 4 --checkpointing_steps 2 --gradient_accumulation_steps 1 --snr_gamma 5 --train_text_encoder_lora --export_kohya 2>&1 | tail -1 || ok=0
  rm -rf $T/$fam-s3/checkpoint-4 $T/$fam-s3/embeddings $T/$fam-s3/pytorch_lora_weights.safetensors
  python3 train_lora.py $common --output_dir $T/$fam-s3 --stage_dir $T/$fam-s2 $val --max_train_steps 4 --checkpointing_steps 2 --gradient_accumulation_steps 1 --snr_gamma 5 --train_text_encoder_lora --export_kohya --resume_from_checkpoint latest 2>&1 | tail -1 || ok=0
  python3 inference.py --pretrained_model_name_or_path $T/$fam --stage_dir $T/$fam-s3 --prompt "a <redball> next to a <bluebox>" --num_images_per_prompt 2 --num_inference_steps 4 --output_dir $T/$fam-gen 2>&1 | tail -1 || ok=0
  for f in $T/$fam-s1/confusion.json $T/$fam-s2/validation/step-000004.png $T/$fam-s3/pytorch_lora_weights.safetensors $T/$fam-gen/contact_sheet.png; do
    [ -f $f ] && echo "ok $f" || { echo "MISSING $f"; ok=0; }
  done
  python3 -c "import json,sys; s=json.load(open('$T/$fam-s3/run_stats.json')); print('$fam stage3 fp16 losses', s['losses'])"
done
echo "smoke ok=$ok"
python3 -m bench.benchmark --steps 10 --stages ti,lora --json $OUT/bench.json
