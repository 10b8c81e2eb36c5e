#!/usr/bin/env bash
# Wheels for what the offline GPU machine lacks, downloaded here (where PyPI is reachable) into the
# ignored folder .whl/, so that they travel with the working tree (benchmarks/gpu_check.sh installs
# them there with pip --no-index). About 1.3 MB.
#
#   bash scripts/gpu_wheels.sh
#
# The machine (docs/scaling.md, "A GPU machine with no network") has Python 3.12, torch, transformers,
# accelerate, peft, numpy, pyarrow, pandas, xxhash, sympy, tokenizers and huggingface-hub; lmpg imports
# and trains without the two it lacks, datasets (prompt files, hub datasets) and math-verify
# (math_answer on non-numeric answers), and these wheels add them with the pure-Python packages they
# need that the machine does not have (dill, multiprocess; latex2sympy2_extended, antlr4 runtime).
# --no-deps: each dependency is named here, pinned to one version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
WHEELS=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
