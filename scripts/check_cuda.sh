#!/usr/bin/env bash
# Compile-only check of the CUDA side on a machine without a GPU: every .cu under csrc/
# with nvcc for sm_80 and sm_90, and the op glue with TORCHSLIM_WITH_CUDA against torch's
# headers (the CPU wheel ships ATen/cuda and c10/cuda). Skips cleanly without nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "check_cuda: nvcc not found, CUDA compile check skipped"
  exit 0
fi
# nvcc may be a link (e.g. /usr/local/bin/nvcc): find the toolkit through the real path.
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
[ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] || CUDA_HOME=/usr/local/cuda
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
n=0
for cu in csrc/kernels/cuda/*.cu; do
  [ -e "$cu" ] || continue
  "$NVCC" -std=c++17 -O3 -Icsrc --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$cu" -o "$TMP/$(basename "$cu").o"
  echo "check_cuda: nvcc ok  $cu"
  n=$((n + 1))
done
for cpp in csrc/ops/*.cpp; do
  g++ -std=c++20 -fsyntax-only -DTORCHSLIM_WITH_CUDA=1 -Icsrc $TORCH_INC -I"$CUDA_HOME/include" "$cpp"
  echo "check_cuda: glue ok  $cpp"
done
echo "check_cuda: $n CUDA kernel files compiled for sm_80 and sm_90"
