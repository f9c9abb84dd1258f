#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with a pinned CPU torch, the
# build tools, and torchslim built against that torch. Safe to run again (it only
# rebuilds what changed). Override the torch pin with TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.25"
# --no-build-isolation: compile against the torch installed above, not a second one.
# A constraints file pins the installed torch so that no dependency (transformers, ...)
# can replace it with another build.
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$VENV/torch-constraint.txt"
"$VENV/bin/python" -m pip install -q -c "$VENV/torch-constraint.txt" --no-build-isolation -Cbuild-dir=build/pip ".[test,pipeline]"
"$VENV/bin/python" -m torchslim info
