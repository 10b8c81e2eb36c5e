#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the embedded default recipe on CPU: no download, a few minutes.
# A second run replaces the first in runs/addition_cpu (--fast: runs/addition_cpu_fast); a directory
# named with --output-dir DIR must be new or empty (overwrite_output_dir=true replaces a run there).
# A user error prints one line and exits with status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python recipes/addition_cpu.py "$@"
