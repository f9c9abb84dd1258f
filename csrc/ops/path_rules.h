// Which kernel runs: the measured crossovers of the masked sparse linear op, in one place.
// The C++ glue (masked_linear.cpp) and the Python modules (torchslim/_path_rules.py, which
// reads these numbers through torchslim._C.path_rules()) both decide with them, so a
// re-measured rule changes here only. Measured on an AMD EPYC (Zen 4, AVX-512), float32;
// benchmarks/RESULTS.md ("Path rules") has the figures.
#pragma once
#include <cstdint>

namespace torchslim {
namespace rules {

// Inference, batch 1: dense while the weight has at most this many elements (the dense GEMV
// of a small layer is as fast as the sparse one, and the sparse call costs more to set up).
constexpr int64_t kMaskedSmallWeightNumel = 32768;
// Inference, batch 1: sparse up to this density while the dense fp32 weight fits in the
// last-level cache, and up to the "large" density once it does not (the dense GEMV is then
// bound by memory, which the sparse one reads less of).
constexpr double kMaskedBatch1MaxDensity = 0.25;
constexpr double kMaskedBatch1LargeMaxDensity = 0.45;
constexpr int64_t kMaskedLargeWeightBytes = int64_t(16) << 20;
// Inference, batch > 1; for bfloat16 / float16 layers the dense product runs the CPU's
// half-width dot products (oneDNN: AVX512_BF16) while the sparse kernel computes in fp32, so
// the crossover is lower.
constexpr double kMaskedMaxDensity = 0.4;
constexpr double kMaskedMaxDensityLowPrecision = 0.2;
// Training (forward + backward of one step): from kMaskedTrainMinBatch rows, and below it.
constexpr double kMaskedTrainMaxDensity = 0.35;
constexpr double kMaskedTrainSmallMaxDensity = 0.2;
constexpr int64_t kMaskedTrainMinBatch = 64;

// Does the sparse kernel beat the dense product for a layer of weight_numel elements with
// this density, at this batch (rows of the input)? `training`: a step that also needs the
// gradients (the sparse forward, input-gradient and weight-gradient kernels together).
// `low_precision`: a bfloat16 / float16 layer.
inline bool masked_sparse_faster(double density, int64_t batch, int64_t weight_numel, bool training,
                                 bool low_precision = false) {
  if (training) return density <= (batch >= kMaskedTrainMinBatch ? kMaskedTrainMaxDensity : kMaskedTrainSmallMaxDensity);
  if (batch <= 1) {
    if (weight_numel <= kMaskedSmallWeightNumel) return false;
    return density <= (weight_numel * 4 > kMaskedLargeWeightBytes ? kMaskedBatch1LargeMaxDensity : kMaskedBatch1MaxDensity);
  }
  return density <= (low_precision ? kMaskedMaxDensityLowPrecision : kMaskedMaxDensity);
}

}  // namespace rules
}  // namespace torchslim
