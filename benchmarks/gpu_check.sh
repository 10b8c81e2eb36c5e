#!/usr/bin/env bash
# The GPU check, offline: one command on a GPU machine with no network (no pip registry, no model
# hub), under 8 minutes on one H200. It runs lmpg from this source tree against the machine's own
# torch / transformers / accelerate / peft, plus the wheels in .whl/ if present (scripts/gpu_wheels.sh
# downloads them beforehand where PyPI is reachable; lmpg runs without them).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]           # default: $OUT, else gpu_check/
#   BUDGET=300 bash benchmarks/gpu_check.sh          # seconds for the benchmark rows (default 390)
#   SMOKE=1 bash benchmarks/gpu_check.sh /tmp/x      # the same steps on a CPU, tiny shapes (bench_gpu --smoke)
#
# Writes OUT_DIR/gpu_check.json and gpu_check.md (benchmarks/bench_gpu.py: Qwen2.5-0.5B and 1.5B
# shapes, random bf16 weights), log.txt and gpu.txt. What the figures are: docs/scaling.md.
# With network and the real model and GSM8K: benchmarks/gpu_check_online.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRANSFORMERS_VERBOSITY=error PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT_DIR/gpu.txt" 2>&1 || true
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=$(mktemp -d /tmp/lmpg_site.XXXX)
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  else  # no pip: the wheels are pure Python, a zip each
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" .whl/*.whl
  fi || echo "installing .whl/ failed; running without it" >&2
  export PYTHONPATH="$PYTHONPATH:$SITE"  # only packages the machine lacks (scripts/gpu_wheels.sh)
fi
# a hard stop a little past the budget, so the command always returns inside 8 minutes; the JSON
# and the table are rewritten after every row, so a stopped run keeps what it measured
timeout 460 "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" --budget "${BUDGET:-390}" ${SMOKE:+--smoke} 2>&1 | tee "$OUT_DIR/log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc; $OUT_DIR/gpu_check.json, $OUT_DIR/gpu_check.md"
exit "$rc"
