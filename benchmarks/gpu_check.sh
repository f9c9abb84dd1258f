#!/usr/bin/env bash
# GPU check in one go, for a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. build torchslim._C in place with the CUDA kernels (build/cuda),
#   2. run the test suite (CUDA tests run instead of skipping),
#   3. run the kernel benchmarks on the GPU (quick sets),
#   4. print a short table of the GPU figures last.
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (PYTHON=python3 by default; OUTDIR=benchmarks/results)
# Nothing here is installed: the build lands in build/cuda and python/torchslim/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUTDIR=${1:-benchmarks/results}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCHSLIM_RESULTS_DIR="$OUTDIR"

"$PYTHON" - <<'EOF' || { echo "gpu_check: torch with a visible CUDA device is required" >&2; exit 2; }
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name()}")
EOF

echo "== build (CUDA on)"
TORCHSLIM_CUDA=ON BUILD_DIR=build/cuda JOBS=${JOBS:-$(nproc)} PYTHON="$PYTHON" bash scripts/dev_build.sh || exit 1
"$PYTHON" -m torchslim info

echo "== tests"
status=0
"$PYTHON" -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -n 30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks (GPU, quick)"
for op in masked_linear codebook_linear kd_loss; do
  "$PYTHON" "benchmarks/bench_${op}.py" --device cuda --quick 2>&1 | tee "$OUTDIR/gpu_bench_${op}.log" || status=1
done

echo "== summary"
"$PYTHON" - "$OUTDIR" <<'EOF'
# Every row that a benchmark measured on the GPU, one line each: case fields, then ratios.
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        data = json.loads(path.read_text())
    except ValueError:
        continue
    if not str(data.get("machine", {}).get("device", "")).startswith("cuda"):
        continue
    print(f"-- {path.stem} on {data['machine'].get('gpu', '?')}")
    for row in data.get("rows", []):
        print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
EOF
exit $status
