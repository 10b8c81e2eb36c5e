#!/usr/bin/env bash
# The online variant: a GPU machine WITH network (pip and the model hub). The project's own GPU
# machine has none: use benchmarks/gpu_check.sh there. The figures it gives, from the real model:
#
#   bash benchmarks/gpu_check_online.sh [OUT_DIR] [ITERATIONS]      # defaults: gpu_check/, 200 (the recipe's own)
#
# 1. the GSM8K LoRA recipe as shipped (recipes/gsm8k_lora.yaml), ITERATIONS iterations: greedy
#    accuracy on 200 test questions before and after (eval.json), the reward curve (metrics.jsonl,
#    metrics.png);
# 2. peak GPU memory of LoRA vs full fine-tuning of the same model (bench_memory.py, bf16).
# Everything lands in OUT_DIR; docs/scaling.md ("The GSM8K recipe", "Memory") is where it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
ITERS=${2:-200}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
mkdir -p "$OUT"
bash scripts/setup.sh
PY=.venv/bin/python
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check is for a GPU machine')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

start=$(date +%s)
.venv/bin/accelerate launch --num_processes 1 --mixed_precision bf16 --dynamo_backend no \
  recipes/gsm8k_lora.py recipes/gsm8k_lora.yaml "model=$MODEL" "iterations=$ITERS" \
  "output_dir=$OUT/gsm8k_lora" 2>&1 | tee "$OUT/recipe.log"
echo "recipe wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/recipe.log"
.venv/bin/lmpg plot "$OUT/gsm8k_lora" -o "$OUT/metrics.png"

$PY benchmarks/bench_memory.py --model "$MODEL" --mixed-precision bf16 --modes full,lora,full-kl,lora-kl \
  --iters 2 --json "$OUT/memory.json" | tee "$OUT/memory.md"
echo "done: $OUT/gsm8k_lora/eval.json, $OUT/metrics.png, $OUT/memory.md"
