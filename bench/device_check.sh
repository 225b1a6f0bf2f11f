#!/usr/bin/env bash
# GPU check (run on a CUDA machine from the repo root, wheels for missing packages in .whl/):
#   PART=smoke    fp16 mixed-precision smoke runs of every stage on the tiny models (validation mid-run, resume)
#   PART=bench    the benchmark on the tiny model and the full SD1.5 architecture (random weights) at 256 px
#   PART=compile  --torch_compile: a compiled fp16 smoke run with resume per mode on the tiny model, then eager vs
#                 compiled (cold and warm inductor cache) on the full SD1.5 architecture at $RES px (default 512),
#                 for the modes in $COMPILE_MODES (default: default,reduce-overhead)
# PART is a comma list (default: smoke,bench,compile). A device command may run 10 minutes at most: the compile part
# cold-compiles the full UNet 4 times for two modes (2 stages x 2 modes; not yet timed on a GPU), so run it alone,
# and if it does not fit, once per mode: PART=compile COMPILE_MODES=default, then COMPILE_MODES=reduce-overhead. The same script runs on a CPU machine for a dry run
# (mixed precision off, reduce-overhead skipped): PART=compile RES=64 ONLY=tiny bash bench/device_check.sh
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; PART=${PART:-smoke,bench,compile}; RES=${RES:-512}; ONLY=${ONLY:-full}
PY=${PY:-python3}
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; MP=fp16; MODES=${COMPILE_MODES:-default,reduce-overhead}
else
  echo "no GPU: dry run on CPU"; MP=no; MODES=${COMPILE_MODES:-default}
fi
$PY -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
T=/tmp/dc; rm -rf $T; mkdir -p $T
$PY -m clif.fixtures.synthetic --out $T/data --num_concepts 2 --num_images 3 >/dev/null
$PY -m clif.fixtures.tiny --family sd15 --out $T/sd15 >/dev/null
ok=1
has() { [[ ",$PART," == *",$1,"* ]]; }
if has smoke; then
  $PY -m clif.fixtures.tiny --family clipseg --out $T/seg >/dev/null
  for fam in sd15 sdxl; do
    $PY -m clif.fixtures.tiny --family $fam --out $T/$fam >/dev/null
    common="--pretrained_model_name_or_path $T/$fam --train_data_dir $T/data --report_to tensorboard --mixed_precision $MP"
    val="--resolution 64 --validation_prompt a_<redball> --validation_steps 2 --validation_inference_steps 2 --num_validation_images 1"
    $PY train_clif.py $common --output_dir $T/$fam-s1 --segmenter $T/seg --cache_dir $T/cache --num_pairs 64 --train_batch_size 16 --max_train_steps 4 2>&1 | tail -2 || ok=0
    $PY train_ti.py $common --output_dir $T/$fam-s2 --stage_dir $T/$fam-s1 $val --max_train_steps 4 --checkpointing_steps 2 --cache_latents --gradient_accumulation_steps 1 2>&1 | tail -1 || ok=0
    $PY train_lora.py $common --output_dir $T/$fam-s3 --stage_dir $T/$fam-s2 $val --max_train_steps 4 --checkpointing_steps 2 --gradient_accumulation_steps 1 --snr_gamma 5 --train_text_encoder_lora --export_kohya 2>&1 | tail -1 || ok=0
    rm -rf $T/$fam-s3/checkpoint-4 $T/$fam-s3/embeddings $T/$fam-s3/pytorch_lora_weights.safetensors
    $PY train_lora.py $common --output_dir $T/$fam-s3 --stage_dir $T/$fam-s2 $val --max_train_steps 4 --checkpointing_steps 2 --gradient_accumulation_steps 1 --snr_gamma 5 --train_text_encoder_lora --export_kohya --resume_from_checkpoint latest 2>&1 | tail -1 || ok=0
    $PY inference.py --pretrained_model_name_or_path $T/$fam --stage_dir $T/$fam-s3 --prompt "a <redball> next to a <bluebox>" --num_images_per_prompt 2 --num_inference_steps 4 --output_dir $T/$fam-gen 2>&1 | tail -1 || ok=0
    for f in $T/$fam-s1/confusion.json $T/$fam-s2/validation/step-000004.png $T/$fam-s3/pytorch_lora_weights.safetensors $T/$fam-gen/contact_sheet.png; do
      [ -f $f ] && echo "ok $f" || { echo "MISSING $f"; ok=0; }
    done
    $PY -c "import json,sys; s=json.load(open('$T/$fam-s3/run_stats.json')); print('$fam stage3 $MP losses', s['losses'])"
  done
fi
if has compile; then
  # compiled stage 2 and 3 on the tiny model, each mode: a 4-step run, and its resume from checkpoint-2 (same files)
  common="--pretrained_model_name_or_path $T/sd15 --train_data_dir $T/data --report_to none --mixed_precision $MP --resolution 64 --gradient_accumulation_steps 1"
  $PY train_ti.py $common --output_dir $T/c-s2 --max_train_steps 2 2>&1 | tail -1 || ok=0
  for mode in ${MODES//,/ }; do
    for run in full part; do
      [ $run = part ] && { mkdir -p $T/c-$mode-part; cp -r $T/c-$mode-full/checkpoint-2 $T/c-$mode-part/; resume="--resume_from_checkpoint latest"; } || resume=""
      $PY train_lora.py $common --output_dir $T/c-$mode-$run --stage_dir $T/c-s2 --max_train_steps 4 --checkpointing_steps 2 --torch_compile --compile_mode $mode $resume 2>&1 | tail -1 || ok=0
    done
    $PY - "$T/c-$mode-full" "$T/c-$mode-part" "$mode" <<'PYEOF' || ok=0
import json, sys, torch
from safetensors.torch import load_file
a, b, mode = sys.argv[1:]
x, y = (load_file(f"{d}/pytorch_lora_weights.safetensors") for d in (a, b))
same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
s = json.load(open(f"{a}/run_stats.json"))
print(f"compile {mode}: resume bit-identical {same}; losses {s['losses']}; first step {s['first_step_ms']:.0f} ms")
sys.exit(0 if same else 1)
PYEOF
  done
  $PY -m bench.benchmark --compile --only $ONLY --stages ti,lora --steps 20 --resolution $RES --compile_modes $MODES --json $OUT/bench_compile.json || ok=0
fi
if has bench; then
  $PY -m bench.benchmark --steps 10 --stages ti,lora --json $OUT/bench.json || ok=0
fi
echo "device check ok=$ok"
