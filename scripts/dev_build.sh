#!/usr/bin/env bash
# In-place development build: compiles torchslim._C with CMake into build/dev and copies
# it (with _build_config.py) into python/torchslim/, so `PYTHONPATH=python` runs the tree.
# Usage: PYTHON=/path/to/python scripts/dev_build.sh   (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# CMake needs an absolute interpreter path (a relative one resolves to another Python).
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
BUILD=${BUILD_DIR:-build/dev}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  -DTORCHSLIM_CUDA="${TORCHSLIM_CUDA:-AUTO}" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"
# Copy then rename: a process that has the old extension loaded keeps its mapping (an
# in-place overwrite would change the pages under it and crash it).
for f in "$BUILD"/_C*.so "$BUILD"/_build_config.py; do
  cp "$f" "python/torchslim/.$(basename "$f").tmp"
  mv -f "python/torchslim/.$(basename "$f").tmp" "python/torchslim/$(basename "$f")"
done
