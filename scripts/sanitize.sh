#!/usr/bin/env bash
# Builds torchslim._C with AddressSanitizer + UndefinedBehaviorSanitizer into build/asan,
# stages it with a copy of the Python package, and runs the op tests under it: well-formed
# inputs (the op tests incl. sparse-codebook and the fused MLP, the fuzz tests), hostile structures (test_internal_ops.py:
# inconsistent / tampered structures, edits behind the version counter, extreme
# _sparse_mlp plans) and concurrent mask edits during forward/backward (test_concurrency.py).
# Any sanitizer report fails the run (halt_on_error). Usage:
#   PYTHON=.venv/bin/python bash scripts/sanitize.sh [pytest args, default: the op tests]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# CMake needs an absolute interpreter path (a relative one resolves to another Python).
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
BUILD=build/asan
STAGE=build/asan-stage
SAN="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTORCHSLIM_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_CXX_FLAGS="$SAN" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp -r python/torchslim "$STAGE/"
rm -f "$STAGE"/torchslim/_C*.so
cp "$BUILD"/_C*.so "$BUILD"/_build_config.py "$STAGE/torchslim/"
# The interpreter is not instrumented: preload the runtimes; leak checking would report
# CPython's and torch's own allocations, so it is off.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:protect_shadow_gap=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
if [ $# -eq 0 ]; then
  set -- tests/test_masked_linear.py tests/test_codebook_linear.py tests/test_sparse_codebook_linear.py \
    tests/test_kd_loss.py tests/test_kd_loss_rows.py tests/test_fuzz.py tests/test_sparse_sequential.py \
    tests/test_internal_ops.py tests/test_concurrency.py tests/test_sparse_codebook_tamper.py \
    tests/test_sparse_codebook_mlp.py
  for f in "$@"; do [ -e "$f" ] || { echo "sanitize: $f missing"; exit 1; }; done
fi
PYTHONPATH="$STAGE" TORCHSLIM_SANITIZE=1 "$PY" -m pytest -q -p no:cacheprovider -x "$@"
echo "sanitize: ASan+UBSan run clean"
