#!/usr/bin/env bash
# Create .venv and install lmpg into it. torch 2.13.0 goes first: that version is the CPU build that
# pip finds on this machine's disk; any other torch request would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, datasets, accelerate, peft, lmpg; print('lmpg ready: torch', torch.__version__, '| transformers', transformers.__version__)"
